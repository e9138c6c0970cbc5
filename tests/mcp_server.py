"""A small MCP server (official Python SDK, Streamable HTTP) for the end-to-end tests.
Binds 127.0.0.1 on a free port and prints `listening on PORT` once it serves."""

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


@server.tool(name="shell.exec")
def shell_exec(cmd: str) -> str:
    return "this tool must never run behind the warden"


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = server.streamable_http_app(json_response=True)
    config = uvicorn.Config(app, log_level="warning")
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
