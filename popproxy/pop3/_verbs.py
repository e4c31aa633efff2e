"""The POP3 verb vocabulary, in one place.

Which verbs exist, which may come before login, which end a pipeline, which
name a message, which reply with a multi-line body: everything the session,
policy, audit and metrics need to know about verbs is defined here and
nowhere else.
"""

from __future__ import annotations

from typing import Final

from ._command import Command

__all__ = [
    "AUTH_ONLY",
    "BARRIERS",
    "KNOWN_VERBS",
    "MESSAGE_VERBS",
    "NAMES_A_MESSAGE",
    "NEVER_FORWARDED",
    "PRE_AUTH",
    "RETRIEVE",
    "STANDARD_VERBS",
    "STOPS_PARSING",
    "UNKNOWN_VERB",
    "arg_octets",
    "completes_login",
    "is_multiline",
    "names_login",
    "recorded",
    "starts_sasl",
]

#: RFC 1939, 1225 (LAST), 2449 (CAPA), 2595 (STLS), 5034 (AUTH), 6856 (UTF8, LANG).
STANDARD_VERBS: Final = frozenset({
    "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "STAT", "LIST", "RETR",
    "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST", "UTF8", "LANG",
})
#: The verbs with a metric label of their own: the standard ones and
#: Dovecot's XCLIENT (which only the proxy may send, so a client's is counted).
KNOWN_VERBS: Final = (
    "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "STAT", "LIST", "RETR",
    "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST", "UTF8", "LANG", "XCLIENT",
)
#: Verbs a client may send before login (RFC 1939, 2449, 2595, 5034, 6856).
PRE_AUTH: Final = frozenset(
    {"USER", "PASS", "APOP", "AUTH", "CAPA", "QUIT", "STLS", "UTF8", "LANG"})
#: Standard verbs that only make sense before login.
AUTH_ONLY: Final = frozenset({"USER", "PASS", "APOP", "AUTH", "STLS", "UTF8"})
#: Only the proxy may tell the upstream who the client is (field notes 1.10).
NEVER_FORWARDED: Final = frozenset({"XCLIENT", "XOIP", "PROXY"})
#: Dispatch barriers: the reply decides the state later commands run in
#: (AUTH with an argument too: see ``starts_sasl``).
BARRIERS: Final = frozenset({"PASS", "APOP", "QUIT", "STLS"})
#: Verbs after which the next client lines may not be parsed as commands:
#: STLS (what follows is discarded) and AUTH with an argument (what follows
#: is SASL data; see ``starts_sasl``).
STOPS_PARSING: Final = frozenset({"STLS", "AUTH"})
#: Verbs whose first argument is a message number.
NAMES_A_MESSAGE: Final = frozenset({"RETR", "TOP", "DELE"})
#: Verbs that read a message (in whole or in part).
RETRIEVE: Final = frozenset({"RETR", "TOP"})
#: The verbs that read, list or delete messages (field notes §4: STAT, LIST
#: and UIDL are metadata access, TOP a partial read, RETR a full read;
#: RFC 1225's LAST reveals what was read): the audit's ``commands = "messages"``.
MESSAGE_VERBS: Final = frozenset({"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "LAST"})


def starts_sasl(cmd: Command) -> bool:
    """``AUTH mechanism ...``: a SASL exchange (RFC 5034).

    A bare ``AUTH`` is not one: it asks for the mechanism list.
    """
    return cmd.verb == "AUTH" and bool(cmd.args)


def completes_login(cmd: Command) -> bool:
    """The reply to this command says whether the client is logged in."""
    return cmd.verb in ("PASS", "APOP") or (cmd.verb == "AUTH" and bool(cmd.args))


def names_login(cmd: Command) -> bool:
    """The command names who is logging in (USER name, AUTH mechanism ...)."""
    return cmd.verb in ("USER", "AUTH") and bool(cmd.args)


def is_multiline(cmd: Command) -> bool:
    """Whether a ``+OK`` reply to ``cmd`` is followed by a multi-line body.

    RETR, TOP and CAPA always; LIST, UIDL, LANG (RFC 6856) and AUTH (the
    non-standard mechanism list Outlook and Thunderbird ask for) only without
    an argument.  ``-ERR`` is always a single line; unknown commands are
    single-line.
    """
    if cmd.verb in ("RETR", "TOP", "CAPA"):
        return True
    return cmd.verb in ("LIST", "UIDL", "LANG", "AUTH") and not cmd.args

#: What the audit and the logs write for a verb that is not a POP3 one (the
#: metrics' ``command`` label for it is the same word).
UNKNOWN_VERB: Final = "OTHER"
_NAMED: Final = frozenset(KNOWN_VERBS)


def recorded(cmd: Command, *, refused: bool = False) -> tuple[str, tuple[str, ...] | None]:
    """The verb and arguments the audit and the logs may write for ``cmd``.

    Redaction cannot be keyed on exact verbs: ``PASSS secret`` or ``XPASS
    secret`` carries a password as surely as ``PASS`` does, and a verb no
    server knows may itself be a password typed on the wrong line.  So a
    verb that is not a POP3 one is written as ``UNKNOWN_VERB`` and its
    arguments never (None); nor are a command's the proxy refused before
    login (``refused``: what a flooding client sends is not stored).
    ``arg_octets`` says how long they were.  Otherwise the arguments are
    ``Command.redacted_args``.
    """
    if cmd.verb not in _NAMED:
        return UNKNOWN_VERB, None
    if refused:
        return cmd.verb, None
    return cmd.verb, cmd.redacted_args()


def arg_octets(cmd: Command) -> int:
    """The arguments' length in octets, as ``bytes(cmd)`` writes them (the
    spaces between them included)."""
    return len(bytes(cmd)) - len(cmd.verb) - 3 if cmd.args else 0
