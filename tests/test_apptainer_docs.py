"""docs/apptainer.md cannot go stale: its flags and variables tables name every option
of the runtime's option table (options.FLAGS), every Apptainer option hpcimage refuses
(options.UNSUPPORTED) and their variables, each with the status the code gives it."""
import re
from pathlib import Path

from hpcimage.runtime import options

DOC = Path(__file__).parent.parent / "docs" / "apptainer.md"


def section(name):
    text = DOC.read_text()
    start = text.index(f"<!-- section: {name}")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end > 0 else None]


def table(name):
    """{first column's backticked words: status} of the section's table rows."""
    rows = {}
    for line in section(name).splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        names = tuple(re.findall(r"`([^`]+)`", cells[0]))
        rows[names] = cells[1:]
    return rows


def test_flags_table_matches_the_option_table():
    rows = table("flags")
    named = {}
    for names, cells in rows.items():
        for n in names:
            assert n not in named, f"{n} listed twice"
            named[n] = cells[0]
    ours = {row[0] for row in options.FLAGS}
    theirs = set(options.UNSUPPORTED) | set(options.UNSUPPORTED_SHORT)
    assert set(named) == ours | theirs, (set(named) ^ (ours | theirs))
    for n in ours:
        own = n in ("--ib", "--dry-run", "--mpi-mode", "--instance")
        assert named[n] == "hpcimage only" if own else named[n] in ("same", "differs"), n
    for n in theirs:
        assert named[n] == "not supported", n
    # the short forms sit in their long form's row
    for short, long in options.UNSUPPORTED_SHORT.items():
        assert any(short in names and long in names for names in rows), short
    for name, attr, *_ in options.FLAGS:
        if len(name) == 2:
            row = next(names for names in rows if name in names)
            assert all(options.VALUED.get(n, options.SWITCHES.get(n)) == attr
                       for n in row), row


def test_variables_table_matches_the_option_table():
    rows = table("variables")
    got = {}
    for names, cells in rows.items():
        var, flag = names[0], cells[0].strip("`")
        assert var.startswith("*_") and var not in got, var
        got[var[2:]] = (flag, cells[-1])
    want = {key: name for key, (attr, valued, name) in options.ENV_KEYS.items()}
    want.update(options.ENV_UNSUPPORTED)
    assert set(got) == set(want), set(got) ^ set(want)
    for key, (flag, status) in got.items():
        assert flag == want[key], key
        if key in options.ENV_KEYS:
            assert status.startswith(("same", "differs")), key
        else:
            assert status.startswith("not supported"), key


def test_every_unsupported_option_is_refused_by_name():
    """The data behind the table: each listed Apptainer option exits 2 naming itself."""
    import pytest
    from hpcimage.errors import UsageError
    for name in list(options.UNSUPPORTED) + list(options.UNSUPPORTED_SHORT):
        with pytest.raises(UsageError) as e:
            options.parse(["exec", name, "img", "true"], {})
        assert e.value.status == 2
        assert e.value.message.startswith(name) and "Apptainer option that hpcimage " \
            "does not support" in e.value.message
