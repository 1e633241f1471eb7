"""Write the man pages of every chatmaild program and of chatmail.ini(5).

    python3 scripts/manpages.py OUTDIR

Each program's page is its own ``--help`` (and, for ``chatmaild``, every
subcommand's), so a page cannot drift from the program; chatmail.ini(5) lists
every key with its default and the doc line ``chatmaild config`` prints.  The
Debian package build runs this against the installed tree (debian/rules).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "1"
DATE = "2026"
SOURCE = "chatmaild"


def console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def run_help(target: str, prog: str, argv: list[str]) -> str:
    """What ``prog argv --help`` prints (the entry point runs in this process)."""
    module, _, func = target.partition(":")
    main = getattr(importlib.import_module(module), func)
    out = io.StringIO()
    old_argv = sys.argv
    sys.argv = [prog, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*argv, "--help"]) if _takes_argv(main) else main()
    finally:
        sys.argv = old_argv
    return out.getvalue()


def _takes_argv(func) -> bool:
    import inspect

    try:
        return len(inspect.signature(func).parameters) > 0
    except (TypeError, ValueError):
        return False


def escape(line: str) -> str:
    """One line of text as roff: backslashes and leading dots/quotes made literal."""
    line = line.replace("\\", "\\e").replace("-", "\\-")
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def summary_of(help_text: str, prog: str) -> str:
    """The ``prog - summary`` line of a description, or its first sentence."""
    for line in help_text.splitlines():
        m = re.match(rf"^{re.escape(prog)}\s+-\s+(.+)$", line.strip())
        if m:
            return m.group(1).rstrip(".")
    for block in help_text.split("\n\n")[1:]:
        if block.strip():
            return block.strip().splitlines()[0].rstrip(".")
    return prog


def subcommands(help_text: str) -> list[str]:
    """The COMMAND choices argparse lists in the positional arguments section."""
    m = re.search(r"^  COMMAND\n((?:    .*\n)+)", help_text, re.M)
    if not m:
        return []
    return [line.split()[0] for line in m.group(1).splitlines() if line.startswith("    ") and
            not line.startswith("     ") and line.split()]  # fmt: skip


def page(name: str, section: str, summary: str, blocks: list[tuple[str, str]]) -> str:
    lines = [
        f'.TH {name.upper()} {section} "{DATE}" "{SOURCE}" "chatmail relay"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(summary)}",
    ]
    for title, text in blocks:
        lines.append(f".SH {title}")
        lines.append(".nf")
        lines += [escape(line) for line in text.rstrip("\n").splitlines()]
        lines.append(".fi")
    return "\n".join(lines) + "\n"


def program_page(prog: str, target: str) -> str:
    main_help = run_help(target, prog, [])
    blocks = [("DESCRIPTION", main_help)]
    if prog == "chatmaild":
        for sub in subcommands(main_help):
            text = run_help(target, prog, [sub])
            blocks.append((f"COMMAND {sub.upper()}", text))
            # one level deeper: account show/create/..., doveauth lookup
            for action in re.findall(r"^  ACTION\n((?:    .*\n)+)", text, re.M)[:1]:
                for line in action.splitlines():
                    if line.startswith("    ") and not line.startswith("     ") and line.split():
                        act = line.split()[0]
                        title = f"COMMAND {sub.upper()} {act.upper()}"
                        blocks.append((title, run_help(target, prog, [sub, act])))
    blocks.append(
        (
            "SEE ALSO",
            "chatmail.ini(5), chatmaild(1); /usr/share/doc/chatmaild/README.Debian",
        )
    )
    return page(prog, SECTION, summary_of(main_help, prog), blocks)


def ini_page() -> str:
    import dataclasses

    from chatmaild.common.config import (
        DEFAULT_CONFIG_PATH,
        config_fields,
        format_size,
        parse_size,
        parse_size_mb,
    )

    keys = []
    for f in config_fields():
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if isinstance(default, bool):
            default = "true" if default else "false"
        elif default is None:
            default = ""
        elif isinstance(default, tuple):
            default = " ".join(default)
        elif isinstance(default, int) and f.metadata["parse"] in (parse_size, parse_size_mb):
            default = format_size(default)
        keys.append(f"{f.name} = {default}\n    {f.metadata['doc']}")
    intro = (
        f"{DEFAULT_CONFIG_PATH} configures every chatmaild program and, through\n"
        "chatmaild setup, Postfix and Dovecot.  One section, [params]; only mail_domain\n"
        "is required.  A bad value stops a program with an error naming the key, the\n"
        "value and what is allowed; unknown keys give one warning.\n"
        "\n"
        "chatmaild config prints every key with its effective value (defaults filled\n"
        "in).  After a change, run chatmaild setup (or dpkg-reconfigure chatmaild).\n"
        "\n"
        "Sizes take a unit: 500M, 2G, 64K.  An empty default is computed from other\n"
        "keys (mailboxes_dir: /home/vmail/mail/<mail_domain>) or means off."
    )
    example = "[params]\nmail_domain = chat.example.org\nmax_mailbox_size = 1G"
    return page(
        "chatmail.ini",
        "5",
        "configuration of a chatmail relay",
        [
            ("DESCRIPTION", intro),
            ("KEYS", "\n".join(keys)),
            ("EXAMPLE", example),
            ("SEE ALSO", "chatmaild(1), chatmaild setup, /usr/share/doc/chatmaild/README.Debian"),
        ],
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for prog, target in console_scripts().items():
        (args.outdir / f"{prog}.{SECTION}").write_text(program_page(prog, target))
    (args.outdir / "chatmail.ini.5").write_text(ini_page())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
