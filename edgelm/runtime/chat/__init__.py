"""Chat on top of any text generator: templates, their limits, and tool calls."""
