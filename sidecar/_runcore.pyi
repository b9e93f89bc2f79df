"""The compiled run core (sidecar/_runcore.c); `sidecar.runcore.RunCore` is its contract."""

def scan_run(
    region: bytes, max_id: int, /
) -> tuple[list[bytes], list[str] | None, bool, bool] | None: ...
def format_run(
    prefix: bytes,
    seq: int,
    ids: list[str] | None,
    data_lines: list[bytes],
    suffix: bytes,
    total: int,
    /,
) -> tuple[list[bytes], list[int]]: ...
