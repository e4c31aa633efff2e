"""The routing map file: format, precedence, errors naming file and line."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.routing import MapEntry, MapFileError, UserMap, load_map_file, parse_map

NAMES = frozenset({"legacy", "new", "archive"})

SAMPLE = """\
# users moved so far
alice        new                  # moved 2026-11-30
bob          new     bob.smith    # logs in upstream as bob.smith

acc*         new
ar?hive[0-9] archive
*            legacy               # everybody else
Carol        new
"""


def test_sample_map() -> None:
    m = parse_map(SAMPLE, NAMES, "users.map")
    assert (m.exact_count, m.glob_count, len(m)) == (3, 3, 6)
    assert m.lookup("alice") == MapEntry("new", None, 2)
    assert m.lookup("bob") == MapEntry("new", "bob.smith", 3)
    assert m.lookup("accounting") == MapEntry("new", None, 5)
    assert m.lookup("archive7") == MapEntry("archive", None, 6)
    assert m.lookup("archive") == MapEntry("legacy", None, 7)
    assert m.lookup("dave") == MapEntry("legacy", None, 7)
    assert repr(m) == "<UserMap users.map: 3 names, 3 globs>"


def test_exact_names_beat_globs_wherever_they_are() -> None:
    # The catch-all comes first, the exact name after it: the name wins.
    m = parse_map("* legacy\nCarol new\n", NAMES)
    assert m.lookup("carol") == MapEntry("new", None, 2)
    assert m.lookup("dave") == MapEntry("legacy", None, 1)


def test_first_matching_glob_in_file_order_wins() -> None:
    m = parse_map("a* new\nal* archive\n* legacy\n", NAMES)
    assert m.lookup("alice").upstream == "new"  # type: ignore[union-attr]
    m = parse_map("al* archive\na* new\n", NAMES)
    assert m.lookup("alice").upstream == "archive"  # type: ignore[union-attr]
    assert m.lookup("bob") is None


def test_case_insensitive_and_backend_user_kept_as_written() -> None:
    m = parse_map("Alice new Alice.Smith\nACC* archive\n", NAMES)
    for typed in ("alice", "ALICE", "aLiCe"):
        assert m.lookup(typed) == MapEntry("new", "Alice.Smith", 1)
    assert m.lookup("accounts").upstream == "archive"  # type: ignore[union-attr]


def test_comments_blank_lines_crlf_and_tabs() -> None:
    text = "# header\r\n\r\n   \r\n\talice\tnew\t# tab separated\r\nbob new #x\r\n#bob legacy\r\n"
    m = parse_map(text, NAMES)
    assert m.lookup("alice") == MapEntry("new", None, 4)
    assert m.lookup("bob") == MapEntry("new", None, 5)
    assert len(m) == 2


def test_a_hash_inside_a_field_is_not_a_comment() -> None:
    m = parse_map("user#1 new\n", NAMES)
    assert m.lookup("user#1") == MapEntry("new", None, 1)


def test_empty_map() -> None:
    m = parse_map("", NAMES)
    assert len(m) == 0
    assert m.lookup("alice") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice new\nbob x\n", 'users.map:2: unknown upstream "x"'),
        ("alice\n", 'users.map:1: "alice" has no upstream'),
        ("a new b c\n", "users.map:1: expected USER UPSTREAM [BACKEND_USER], got 4 fields"),
        ("alice new\n\nALICE legacy\n", 'users.map:3: "ALICE" is already on line 1'),
        ("a* new\nA* legacy\n", 'users.map:2: "A*" is already on line 1'),
        ("al\x01ice new\n", "users.map:1: control character '\\x01'"),
        ("alice new\nbob new bo\x7fb\n", "users.map:2: control character '\\x7f'"),
        ("alice new\nbob\x0bnew\n", "users.map:2: control character '\\x0b'"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(MapFileError) as info:
        parse_map(text, NAMES, "users.map")
    assert str(info.value).startswith(message)
    assert info.value.source == "users.map"


def test_load_map_file(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    path.write_text(SAMPLE)
    m = load_map_file(path, NAMES)
    assert m.source == str(path)
    assert m.lookup("bob") == MapEntry("new", "bob.smith", 3)


def test_load_errors_are_typed_and_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.map"
    expected = re.escape(f"{missing}: cannot read: No such file")
    with pytest.raises(MapFileError, match=f"^{expected}"):
        load_map_file(missing, NAMES)
    bad = tmp_path / "users.map"
    bad.write_bytes(b"alice new\nbob new\nj\xfcrgen new\n")
    with pytest.raises(MapFileError) as info:
        load_map_file(bad, NAMES)
    assert str(info.value) == f"{bad}:3: not UTF-8"
    assert info.value.line == 3
    unknown = tmp_path / "u.map"
    unknown.write_text("alice new\nbob gone\n")
    expected = re.escape(f'{unknown}:2: unknown upstream "gone"')
    with pytest.raises(MapFileError, match=f"^{expected}$"):
        load_map_file(unknown, NAMES)


def test_a_bad_file_never_yields_a_partial_map(tmp_path: Path) -> None:
    # The caller keeps its old map: all it can get is a whole map or an error.
    path = tmp_path / "users.map"
    path.write_text("".join(f"user{i} new\n" for i in range(1000)) + "broken\n")
    with pytest.raises(MapFileError, match=":1001:"):
        load_map_file(path, NAMES)


def test_100k_lines(tmp_path: Path) -> None:
    # The size DESIGN.md promises; how fast it loads is in the module docstring.
    path = tmp_path / "users.map"
    with path.open("w") as f:
        f.write("# generated\n")
        for i in range(100_000):
            f.write(f"user{i:06d}@example.org new backend{i}\n" if i % 3 == 0
                    else f"user{i:06d}@example.org legacy\n")
        f.write("* archive\n")
    m = load_map_file(path, NAMES)
    assert (m.exact_count, m.glob_count) == (100_000, 1)
    assert m.lookup("USER099999@example.org") == MapEntry("new", "backend99999", 100_001)
    assert m.lookup("user000001@example.org") == MapEntry("legacy", None, 3)
    assert m.lookup("someone.else") == MapEntry("archive", None, 100_002)


# ---------------------------------------------------------------- properties

_name_chars = string.ascii_letters + string.digits + ".-_@+"
exact_names = st.text(_name_chars, min_size=1, max_size=12).filter(lambda s: not s.startswith("#"))


@given(st.dictionaries(exact_names.map(str.lower), st.sampled_from(sorted(NAMES)), max_size=30),
       st.lists(exact_names, max_size=10))
def test_exact_lookups_agree_with_a_dict(
    mapping: dict[str, str], probes: list[str]
) -> None:
    text = "".join(f"{user} {upstream}\n" for user, upstream in mapping.items())
    m = parse_map(text, NAMES)
    for user in [*mapping, *probes]:
        found = m.lookup(user.upper())
        expected = mapping.get(user.lower())
        assert (found.upstream if found else None) == expected


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_arbitrary_text_gives_a_map_or_a_map_file_error(text: str) -> None:
    error: MapFileError | None = None
    try:
        m = parse_map(text, NAMES, "fuzz.map")
    except MapFileError as exc:
        error = exc
    if error is not None:
        assert str(error).startswith("fuzz.map:")
    else:
        assert isinstance(m, UserMap)
        m.lookup("alice")
