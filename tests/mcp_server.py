"""A small MCP server (official Python SDK, Streamable HTTP) for the end-to-end tests.
Binds 127.0.0.1 on a free port and prints `listening on PORT` once it serves. With a file name
as its argument, it appends every request it is sent to that file (one JSON line: method, MCP
and x-warden-* headers, body), so a test can prove what never reached it."""

import json
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("warden-test-tools")


@server.tool(name="search")
def search(q: str) -> str:
    return f"3 results for {q}"


@server.tool(name="ticket.create")
def ticket_create(title: str) -> str:
    return f"ticket T-1 created: {title}"


@server.tool(name="secrets.read")
def secrets_read(name: str) -> str:
    return f"value of {name}"


# A name that is not plain ASCII: 2026-07-28 clients send it base64-wrapped in `Mcp-Name`.
@server.tool(name="søk")
def sok(q: str) -> str:
    return f"søkte etter {q}"


@server.tool(name="shell.exec")
def shell_exec(cmd: str) -> str:
    return "this tool must never run behind the warden"


class Seen:
    """ASGI middleware: writes down each request, whole, before the server acts on it."""

    def __init__(self, app, path: str):
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        messages = []
        while True:
            m = await receive()
            messages.append(m)
            if m["type"] != "http.request" or not m.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        headers = [(k.decode(), v.decode("latin-1")) for k, v in scope["headers"] if k.decode().startswith(("mcp-", "x-warden-"))]
        with open(self.path, "a") as f:
            f.write(json.dumps({"method": scope["method"], "headers": headers, "body": body.decode("utf-8", "replace")}) + "\n")
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = server.streamable_http_app(json_response=True)
    if len(sys.argv) > 1:
        app = Seen(app, sys.argv[1])
    config = uvicorn.Config(app, log_level="warning")
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
