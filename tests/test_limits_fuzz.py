"""Chat templates built from hostile pieces under property-based fuzzing.

Templates are assembled at random from loops, macros, namespaces, concatenation, multiplication,
string formatting, filters and str methods with numbers up to 10**9: every example must end in a
string or a one-line ArtifactError/InputError, within its time budget (shortened here to 0.1 s so
that many examples fit), never in another exception, a hang or a memory blow-up.
"""

from __future__ import annotations

import time

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.errors import ArtifactError, InputError  # noqa: E402
from edgelm.runtime.chat import template_limits  # noqa: E402
from edgelm.runtime.chat.template import render_chat  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
NUMBERS = st.sampled_from(["0", "1", "3", "64", "100000", "1000000", "10**9", "-1"])
STRINGS = st.sampled_from(["'x'", "'ab'", "messages[0].content", "ns.s", "''", "'%s%s'", "'{0}{0}'"])


def expressions():
    def extend(inner):
        return st.one_of(
            st.builds("({} * {})".format, inner, NUMBERS),
            st.builds("({} ~ {})".format, inner, inner),
            st.builds("({} + {})".format, inner, inner),
            st.builds("({} % ({}, {}))".format, inner, inner, inner),
            st.builds("{}.format({})".format, inner, inner),
            st.builds("{}.replace('x', {})".format, inner, inner),
            st.builds("({})|center({})".format, inner, NUMBERS),
            st.builds("range({})|join({})".format, NUMBERS, inner),
            st.builds("({}).ljust({})".format, inner, NUMBERS),
            st.builds("([{}]|batch({}, 'x')|list)|length".format, inner, NUMBERS),
            st.builds("lipsum({})".format, NUMBERS),
            st.builds("({} ** {})".format, NUMBERS, NUMBERS),
        )

    return st.recursive(STRINGS, extend, max_leaves=6)


def statements():
    leaf = st.one_of(
        st.builds("{{{{ {} }}}}".format, expressions()),
        st.builds("{{% set ns.s = {} %}}".format, expressions()),
        st.just("text"),
    )

    def extend(inner):
        body = st.lists(inner, min_size=1, max_size=3).map("".join)
        return st.one_of(
            st.builds("{{% for i in range({}) %}}{}{{% endfor %}}".format, NUMBERS, body),
            st.builds("{{% macro m(k) %}}{}{{{{ m(k) }}}}{{% endmacro %}}{{{{ m(1) }}}}".format, body),
            st.builds("{{% set block %}}{}{{% endset %}}{{{{ block ~ block }}}}".format, body),
            st.builds("{{% for m in messages recursive %}}{}{{{{ loop(messages) }}}}{{% endfor %}}".format, body),
        )

    return st.recursive(leaf, extend, max_leaves=5)


@settings(max_examples=fuzz_examples(ci=150))
@given(statements())
def test_any_hostile_template_renders_or_fails_in_one_line(monkeypatch_budget, body):
    template = "{% set ns = namespace(s='x') %}" + body
    started = time.monotonic()
    try:
        text = render_chat(template, MESSAGES)
    except (ArtifactError, InputError) as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(text, str) and len(text) <= template_limits.MIN_OUTPUT_CHARS
    assert time.monotonic() - started < 5  # the budget is 0.1 s; generous for a busy machine


@pytest.fixture(scope="module")
def monkeypatch_budget():
    saved = template_limits.RENDER_SECONDS
    template_limits.RENDER_SECONDS = 0.1
    yield
    template_limits.RENDER_SECONDS = saved
