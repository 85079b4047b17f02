"""The decode child process of `vpref.data.video` (see `_DecodeWorker`)."""

import os
import sys

from vpref.data.video import VideoDecodeError, decode_in_process, recv_msg, send_msg


def main() -> None:
    # Keep the protocol on a private copy of stdout; whatever a decoder library prints goes to
    # stderr instead of corrupting the message stream.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        try:
            path, num_frames, size, backend = recv_msg(inp)
        except EOFError:
            return
        try:
            send_msg(out, ("ok", decode_in_process(path, num_frames, size, backend)))
        except VideoDecodeError as e:
            send_msg(out, ("err", (e.path, e.cause)))
        except Exception as e:  # anything else the decoder throws is still this file's fault
            send_msg(out, ("err", (path, f"decoder failed: {type(e).__name__}: {e}")))


if __name__ == "__main__":
    main()
