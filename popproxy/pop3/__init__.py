"""Sans-IO POP3 wire protocol: bytes in, typed values out.

No sockets, no trio, no clock, no logging: everything here is a pure
function of the bytes it is given, so it is tested with byte strings alone
(the approach of h11).  Every limit lives here and raises a typed error.
"""

from ._command import SECRET_VERBS as SECRET_VERBS
from ._command import Command as Command
from ._command import LineReader as LineReader
from ._command import message_number as message_number
from ._command import parse_command as parse_command
from ._errors import ClientProtocolError as ClientProtocolError
from ._errors import LineTooLong as LineTooLong
from ._errors import MalformedLine as MalformedLine
from ._errors import PipelineOverflow as PipelineOverflow
from ._errors import ProtocolError as ProtocolError
from ._errors import UpstreamProtocolError as UpstreamProtocolError
from ._response import BodyReader as BodyReader
from ._response import Status as Status
from ._response import is_multiline as is_multiline
from ._response import parse_status as parse_status
from ._response import stuff as stuff

__all__ = [
    "SECRET_VERBS",
    "BodyReader",
    "ClientProtocolError",
    "Command",
    "LineReader",
    "LineTooLong",
    "MalformedLine",
    "PipelineOverflow",
    "ProtocolError",
    "Status",
    "UpstreamProtocolError",
    "is_multiline",
    "message_number",
    "parse_command",
    "parse_status",
    "stuff",
]
