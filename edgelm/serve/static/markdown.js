// A small Markdown renderer for model replies that builds DOM nodes and sets only text.
//
// Safe by construction: every piece of the reply becomes a text node (never parsed as HTML), so HTML,
// <script> and event handlers in a reply show as the characters they are. Links are made only for
// absolute http(s) URLs and open without a referrer; image syntax stays text, so a reply cannot make
// the browser load anything. Every pattern is bounded, so a hostile reply cannot make it slow.

const MAX_DEPTH = 8; // nested quotes and lists; deeper lines render as plain paragraphs
const SPAN = 1000; // the longest emphasis, code span or link text matched inline

const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]{0,40})/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*))?$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])[ \t]+/;
const BLANK = /^[ \t]*$/;

// One pass over inline text: the earliest of these wins; unmatched text stays text.
const INLINE = new RegExp([
  String.raw`\\(?<escaped>[!-/:-@[-\`{-~])`,
  String.raw`(?<ticks>\`{1,3})(?<code>[^\n]{1,${SPAN}}?)\k<ticks>(?!\`)`,
  String.raw`(?<image>!\[[^\]\n]{0,${SPAN}}\]\([^()\s]{0,2000}\))`, // kept as text, never loaded
  String.raw`\[(?<label>[^\]\n]{1,${SPAN}})\]\(\s{0,10}(?<href>[^()\s]{1,2000})\s{0,10}\)`,
  String.raw`\*\*(?=\S)(?<strong>[^\n]{0,${SPAN}}?\S)\*\*`,
  String.raw`(?<!\w)__(?=\S)(?<bold>[^\n]{0,${SPAN}}?\S)__(?!\w)`,
  String.raw`\*(?=[^\s*])(?<em>[^\n]{0,${SPAN}}?[^\s*])\*(?!\*)`,
  String.raw`(?<!\w)_(?=[^\s_])(?<underscored>[^\n]{0,${SPAN}}?[^\s_])_(?!\w)`, // never inside snake_case
  String.raw`~~(?=\S)(?<deleted>[^\n]{0,${SPAN}}?\S)~~`,
  String.raw`(?<url>https?:\/\/[^\s<>()"'\`]{0,2000}[^\s<>()"'\`.,;:!?])`,
].join("|"), "g");

/** The http(s) URL `text` names, or null: other schemes (javascript:, data:, file:) and relative paths stay text. */
export function safeUrl(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

/** `text` (Markdown) as a DocumentFragment of plain elements and text nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  renderBlocks(lines, fragment, 0);
  return fragment;
}

function renderBlocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (BLANK.test(line)) {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      i = codeBlock(lines, i, fence, parent);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const element = el(`h${Math.min(heading[1].length + 2, 6)}`); // a reply's "#" is not the page's title
      renderInline(headingText(heading[2] ?? ""), element);
      parent.append(element);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (depth < MAX_DEPTH && QUOTE.test(line)) {
      i = quote(lines, i, parent, depth);
      continue;
    }
    if (depth < MAX_DEPTH && ITEM.test(line)) {
      i = list(lines, i, parent, depth);
      continue;
    }
    i = paragraph(lines, i, parent);
  }
}

function headingText(text) {
  // "## Title ##": the closing hashes are decoration (a loop, not a pattern, so long lines stay linear)
  const trimmed = text.trimEnd();
  let end = trimmed.length;
  while (end > 0 && trimmed[end - 1] === "#") end -= 1;
  const closed = end < trimmed.length && (end === 0 || trimmed[end - 1] === " " || trimmed[end - 1] === "\t");
  return closed ? trimmed.slice(0, end).trimEnd() : trimmed;
}

function startsBlock(line) {
  return BLANK.test(line) || FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line);
}

function codeBlock(lines, start, fence, parent) {
  const marker = fence[1];
  const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}[ \\t]*$`);
  let end = start + 1;
  while (end < lines.length && !closing.test(lines[end])) end += 1;
  // an unclosed fence (a reply still streaming) runs to the end of the text
  parent.append(codeBox(lines.slice(start + 1, end).join("\n"), fence[2]));
  return end + 1;
}

/** A code block with its language and a copy button. */
export function codeBox(code, language) {
  const box = el("div", "code");
  const head = el("div", "code-head");
  const label = el("span", "code-lang");
  label.textContent = language || "code";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.title = "Copy the code";
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(label, copy);
  const pre = el("pre");
  const codeElement = el("code");
  codeElement.textContent = code;
  pre.append(codeElement);
  box.append(head, pre);
  return box;
}

async function copyText(text, button) {
  let copied = false;
  try {
    await navigator.clipboard.writeText(text); // needs a secure context: localhost is one
    copied = true;
  } catch {
    copied = copyBySelection(text);
  }
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

function copyBySelection(text) {
  // the older way, for a page served over plain http to another machine
  const area = el("textarea", "offscreen");
  area.value = text;
  document.body.append(area);
  area.select();
  let done = false;
  try {
    done = document.execCommand("copy");
  } catch {
    done = false;
  }
  area.remove();
  return done;
}

function quote(lines, start, parent, depth) {
  const inner = [];
  let i = start;
  while (i < lines.length && QUOTE.test(lines[i])) {
    inner.push(lines[i].replace(QUOTE, ""));
    i += 1;
  }
  const element = el("blockquote");
  renderBlocks(inner, element, depth + 1);
  parent.append(element);
  return i;
}

function list(lines, start, parent, depth) {
  const first = ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const element = el(ordered ? "ol" : "ul");
  if (ordered) {
    const number = parseInt(first[2], 10);
    if (number !== 1) element.start = number;
  }
  let i = start;
  while (i < lines.length) {
    const item = ITEM.exec(lines[i]);
    if (!item || /\d/.test(item[2]) !== ordered) break;
    const body = [lines[i].slice(item[0].length)];
    const indent = item[0].length;
    i += 1;
    // the item's own lines: indented ones (a nested list, a code block) and lazy continuations
    while (i < lines.length) {
      const line = lines[i];
      const indented = line.length - line.trimStart().length >= Math.min(indent, 4);
      if (!BLANK.test(line) && indented) {
        body.push(line.slice(Math.min(indent, line.length - line.trimStart().length)));
      } else if (!BLANK.test(line) && !startsBlock(line)) {
        body.push(line);
      } else if (BLANK.test(line) && i + 1 < lines.length && /^[ \t]{2,}\S/.test(lines[i + 1])) {
        body.push("");
      } else {
        break;
      }
      i += 1;
    }
    const li = el("li");
    renderItem(body, li, depth);
    element.append(li);
    while (i < lines.length && BLANK.test(lines[i]) && i + 1 < lines.length && ITEM.test(lines[i + 1])) i += 1;
  }
  parent.append(element);
  return i;
}

function renderItem(body, li, depth) {
  if (body.length === 1) {
    renderInline(body[0], li); // a tight item: no paragraph around its text
    return;
  }
  renderBlocks(body, li, depth + 1);
}

function paragraph(lines, start, parent) {
  const text = [lines[start]];
  let i = start + 1;
  while (i < lines.length && !startsBlock(lines[i])) {
    text.push(lines[i]);
    i += 1;
  }
  const element = el("p");
  text.forEach((line, n) => {
    if (n > 0) element.append(el("br")); // a chat reply's line breaks are meant
    renderInline(line, element);
  });
  parent.append(element);
  return i;
}

/** Inline Markdown of `text` appended to `parent`: code, links, emphasis; everything else as text. */
export function renderInline(text, parent, inLink = false) {
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    appendText(parent, text.slice(at, m.index));
    renderMatch(m.groups, m[0], parent, inLink);
    at = m.index + m[0].length;
  }
  appendText(parent, text.slice(at));
}

function renderMatch(g, whole, parent, inLink) {
  if (g.escaped !== undefined) {
    appendText(parent, g.escaped);
  } else if (g.code !== undefined) {
    const code = el("code");
    code.textContent = g.code;
    parent.append(code);
  } else if (g.href !== undefined) {
    link(g.label, g.href, whole, parent, inLink);
  } else if (g.url !== undefined) {
    link(g.url, g.url, whole, parent, inLink);
  } else if ((g.strong ?? g.bold) !== undefined) {
    wrap("strong", g.strong ?? g.bold, parent, inLink);
  } else if ((g.em ?? g.underscored) !== undefined) {
    wrap("em", g.em ?? g.underscored, parent, inLink);
  } else if (g.deleted !== undefined) {
    wrap("del", g.deleted, parent, inLink);
  } else {
    appendText(parent, whole); // an image, shown as the text it was
  }
}

function link(label, target, whole, parent, inLink) {
  const href = inLink ? null : safeUrl(target);
  if (href === null) {
    appendText(parent, whole);
    return;
  }
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  a.title = href;
  renderInline(label, a, true);
  parent.append(a);
}

function wrap(tag, inner, parent, inLink) {
  const element = el(tag);
  renderInline(inner, element, inLink);
  parent.append(element);
}

function appendText(parent, text) {
  if (text) parent.append(document.createTextNode(text));
}

function el(tag, className) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  return element;
}
