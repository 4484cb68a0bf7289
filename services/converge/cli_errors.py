"""What a `converge` command that calls a service does with the service's
gRPC error: one message on stderr and one exit code per status, the same in
every command (`score`, `recommend`, `alerts`, `customer`), so that scripts
can branch on the code.

Registering a command imports nothing heavy: grpc is imported when an
error is reported."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK = 0
EXIT_USAGE = 2  # a bad request (the message names the field)
EXIT_UNREACHABLE = 3  # the service is unreachable or did not answer in time
EXIT_NOT_FOUND = 4  # no such customer, ticket, alert, ...
EXIT_REFUSED = 5  # the state forbids it now (FAILED_PRECONDITION)


def report_rpc_error(
    error: Any, called: str, console: Console, *, not_found: str = "Not found"
) -> int:
    """Prints why the call failed and returns the command's exit code.
    `called` names what was asked ("the scoring service at HOST:PORT");
    `not_found` heads the message of NOT_FOUND."""
    import grpc

    code, details = error.code(), error.details()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        console.print(f"[red]No answer from {called}:[/] {details}", highlight=False)
        return EXIT_UNREACHABLE
    if code == grpc.StatusCode.NOT_FOUND:
        console.print(f"[red]{not_found}:[/] {details}", highlight=False)
        return EXIT_NOT_FOUND
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        console.print(f"[red]Refused:[/] {details}", highlight=False)
        return EXIT_REFUSED
    console.print(f"[red]{code.name}:[/] {details}", highlight=False)
    return EXIT_USAGE
