"""Sans-IO POP3 wire protocol: bytes in, typed values out.

No sockets, no trio, no clock, no logging: everything here is a pure
function of the bytes it is given, so it is tested with byte strings alone
(the approach of h11).  Every limit lives here and raises a typed error.

- ``_command``: client command lines (framing, parsing, ``Command``);
- ``_response`` and ``_reader``: upstream status lines and multi-line
  bodies (``ResponseReader``, told what to expect per command);
- ``_bodies``: what is read out of bodies (message facts and headers,
  listings, CAPA);
- ``_sasl``: SASL responses;
- ``_verbs``: the verb vocabulary; ``_state``: the RFC 1939 states and
  their transitions.

Everything in ``__all__`` is the public surface; the modules are private.
"""

from ._bodies import HEADER_OCTETS as HEADER_OCTETS
from ._bodies import Listing as Listing
from ._bodies import MessageFacts as MessageFacts
from ._bodies import header_values as header_values
from ._bodies import listing_line as listing_line
from ._bodies import message_id as message_id
from ._bodies import rewrite_capa as rewrite_capa
from ._command import Command as Command
from ._command import LineReader as LineReader
from ._command import message_number as message_number
from ._command import parse_command as parse_command
from ._errors import ClientProtocolError as ClientProtocolError
from ._errors import LineTooLong as LineTooLong
from ._errors import MalformedLine as MalformedLine
from ._errors import PipelineOverflow as PipelineOverflow
from ._errors import ProtocolError as ProtocolError
from ._errors import ReplyTooLong as ReplyTooLong
from ._errors import UpstreamProtocolError as UpstreamProtocolError
from ._reader import NEED_DATA as NEED_DATA
from ._reader import BodyChunk as BodyChunk
from ._reader import Expect as Expect
from ._reader import Reply as Reply
from ._reader import ResponseReader as ResponseReader
from ._response import BodyReader as BodyReader
from ._response import Sink as Sink
from ._response import Status as Status
from ._response import announced_size as announced_size
from ._response import has_apop_timestamp as has_apop_timestamp
from ._response import parse_status as parse_status
from ._response import stuff as stuff
from ._sasl import is_sasl_line as is_sasl_line
from ._sasl import sasl_user as sasl_user
from ._state import LOGGED_IN as LOGGED_IN
from ._state import STLS_OK as STLS_OK
from ._state import State as State
from ._state import Trigger as Trigger
from ._state import local_reply as local_reply
from ._state import transition as transition
from ._verbs import AUTH_ONLY as AUTH_ONLY
from ._verbs import BARRIERS as BARRIERS
from ._verbs import KNOWN_VERBS as KNOWN_VERBS
from ._verbs import MESSAGE_VERBS as MESSAGE_VERBS
from ._verbs import NAMES_A_MESSAGE as NAMES_A_MESSAGE
from ._verbs import NEVER_FORWARDED as NEVER_FORWARDED
from ._verbs import PRE_AUTH as PRE_AUTH
from ._verbs import RETRIEVE as RETRIEVE
from ._verbs import STANDARD_VERBS as STANDARD_VERBS
from ._verbs import STOPS_PARSING as STOPS_PARSING
from ._verbs import UNKNOWN_VERB as UNKNOWN_VERB
from ._verbs import arg_octets as arg_octets
from ._verbs import completes_login as completes_login
from ._verbs import is_multiline as is_multiline
from ._verbs import names_login as names_login
from ._verbs import recorded as recorded
from ._verbs import starts_sasl as starts_sasl

__all__ = [
    "AUTH_ONLY",
    "BARRIERS",
    "HEADER_OCTETS",
    "KNOWN_VERBS",
    "LOGGED_IN",
    "MESSAGE_VERBS",
    "NAMES_A_MESSAGE",
    "NEED_DATA",
    "NEVER_FORWARDED",
    "PRE_AUTH",
    "RETRIEVE",
    "STANDARD_VERBS",
    "STLS_OK",
    "STOPS_PARSING",
    "UNKNOWN_VERB",
    "BodyChunk",
    "BodyReader",
    "ClientProtocolError",
    "Command",
    "Expect",
    "LineReader",
    "LineTooLong",
    "Listing",
    "MalformedLine",
    "MessageFacts",
    "PipelineOverflow",
    "ProtocolError",
    "Reply",
    "ReplyTooLong",
    "ResponseReader",
    "Sink",
    "State",
    "Status",
    "Trigger",
    "UpstreamProtocolError",
    "announced_size",
    "arg_octets",
    "completes_login",
    "has_apop_timestamp",
    "header_values",
    "is_multiline",
    "is_sasl_line",
    "listing_line",
    "local_reply",
    "message_id",
    "message_number",
    "names_login",
    "parse_command",
    "parse_status",
    "recorded",
    "rewrite_capa",
    "sasl_user",
    "starts_sasl",
    "stuff",
    "transition",
]
