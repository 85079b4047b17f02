"""Moved: the endpoint engine lives in `vpref.judges.engines.openai`, the loopback servers in
`vpref.judges.engines.loopback`."""

from vpref.judges.engines.loopback import serve_loopback  # noqa: F401
from vpref.judges.engines.openai import CircuitOpen, EndpointError, OpenAIChat  # noqa: F401
