#!/usr/bin/env python3
"""Renders a man page written in Markdown (docs/policies.md) as roff, so that the Markdown stays
the one source. Handles the subset those pages use: `# title(N)`, `##`/`###` sections, paragraphs,
`-` and `1.` lists, fenced code, pipe tables, and `code`, **bold**, *italic* inline.

Usage: scripts/md2man.py SOURCE.md OUT.N          write OUT.N
       scripts/md2man.py --check SOURCE.md OUT.N  exit 1 if OUT.N is not what SOURCE.md gives
"""
import re
import sys


def esc(text):
    text = text.replace("\\", "\\e")
    return text


def inline(text):
    out = []
    # Split on code spans first: nothing inside them is markup.
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:
            out.append("\\fB" + esc(part).replace("-", "\\-") + "\\fR")
            continue
        part = esc(part)
        part = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", part)
        part = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\\fI\1\\fR", part)
        out.append(part)
    return "".join(out)


def line_safe(s):
    # A line starting with . or ' would be a roff request.
    return "\\&" + s if s[:1] in (".", "'") else s


def table(rows):
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head, body = cells[0], [r for r in cells[2:]]
    n = len(head)
    out = [".TS", "allbox tab(\x1f);", " ".join(["lb"] * n), " ".join(["lx"] * n) + "."]
    out.append("\x1f".join(inline(h) for h in head))
    for r in body:
        r = (r + [""] * n)[:n]
        out.append("\x1f".join("T{\n" + line_safe(inline(c)) + "\nT}" for c in r))
    out.append(".TE")
    return out


def convert(md):
    lines = md.split("\n")
    out = []
    m = re.match(r"#\s+(.*?)\s*(\S+)\((\d)\)\s*$", lines[0])
    if not m:
        sys.exit("md2man: the first line must be '# [prefix] NAME(SECTION)'")
    name, section = m.group(2), m.group(3)
    out += ["'\\\" t", f'.TH {name.upper()} {section} "" "slurm-rebalancer" "slurm-rebalancer"',
            f".\\\" Generated from the Markdown source by scripts/md2man.py; edit that instead."]
    i, para = 1, []

    def flush():
        if para:
            out.append(".PP")
            out.extend(line_safe(inline(p)) for p in para)
            para.clear()

    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            flush()
            out += [".PP", ".RS 4", ".nf", ".ft CR"]
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                out.append(line_safe(esc(lines[i]).replace("-", "\\-")))
                i += 1
            out += [".ft R", ".fi", ".RE"]
        elif ln.startswith("### "):
            flush()
            out.append(".SS " + inline(ln[4:]))
        elif ln.startswith("## "):
            flush()
            out.append(".SH " + inline(ln[3:]).upper())
        elif ln.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            out += [".PP"] + table(rows)
            continue
        elif re.match(r"(\s*)(-|\d+\.)\s", ln):
            flush()
            mk = re.match(r"(\s*)(-|\d+\.)\s+(.*)", ln)
            depth = len(mk.group(1)) // 2
            bullet = "\\(bu" if mk.group(2) == "-" else mk.group(2)
            item = [mk.group(3)]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and not re.match(r"\s*(-|\d+\.)\s", lines[i]):
                item.append(lines[i].strip())
                i += 1
            if depth:
                out.append(".RS 4")
            out.append(f".IP {bullet} 4")
            out.extend(line_safe(inline(t)) for t in item)
            if depth:
                out.append(".RE")
            continue
        elif not ln.strip():
            flush()
        else:
            para.append(ln.strip())
        i += 1
    flush()
    return "\n".join(out) + "\n"


def main(argv):
    check = argv[:1] == ["--check"]
    if check:
        argv = argv[1:]
    if len(argv) != 2:
        sys.exit(__doc__)
    src, dst = argv
    roff = convert(open(src, encoding="utf-8").read())
    if check:
        try:
            current = open(dst, encoding="utf-8").read()
        except FileNotFoundError:
            current = None
        if current != roff:
            sys.exit(f"md2man: {dst} is out of date with {src}: run scripts/md2man.py {src} {dst}")
        return
    open(dst, "w", encoding="utf-8").write(roff)


if __name__ == "__main__":
    main(sys.argv[1:])
