"""`tether inject` and `tether uninject`: the sans-IO injection (`tether.inject`) over a
multi-document YAML stream, offline, like `kubectl kustomize`:

    helm template my-mcp ./chart | tether inject -f - | kubectl apply -f -

The YAML is read with ruamel.yaml's round-trip loader, which keeps comments, key order and
quoting (PyYAML drops every comment: of the 178 comment lines in deploy/, it keeps 0; ruamel
gives all 17 files back byte for byte). Each document is parsed on its own and a document the
command does not change is written back as its original text, so comment-only documents (as
`helm template` writes, `# Source: ...`) and anything the YAML library would reformat stay as
they were. A changed document is written in the indentation its text used.

Rules:
1. `inject`: every workload the opt-in marks (all of them with `--all`) is injected; every
   Service of the stream that selects an injected workload is retargeted to the sidecar's
   proxied port, and its names are added to that sidecar's allowed Host names.
2. `uninject`: every injected workload and retargeted Service is put back as it was.
3. Any error is one line on stderr and exit 1; nothing is written to stdout then.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.inject import (
    InjectConfig,
    InjectError,
    inject,
    injected_workload,
    restore_service,
    retarget_service,
    selects,
    service_host_names,
    uninject,
)

if TYPE_CHECKING:
    from ruamel.yaml import YAML

_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.M)
_DEFAULTS = InjectConfig()


@dataclass
class _Document:
    """One document of the stream: the separator line before it (or "") and its text."""

    separator: str
    text: str
    obj: Any
    indent: tuple[int, int, int]
    new: Any = None


def _guess_indent(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) for ruamel.yaml's `indent`, as the text's first nested
    mapping and first block sequence under a key use them."""
    mapping = 2
    nested = re.search(r"^( *)[^\s#-][^\n]*:[ \t]*\n\1( +)[^\s#-]", text, re.M)
    if nested:
        mapping = len(nested.group(2))
    offset = 0
    seq = re.search(r"^( *)[^\s#-][^\n]*:[ \t]*\n(?: *#[^\n]*\n)*( *)- ", text, re.M)
    if seq and len(seq.group(2)) > len(seq.group(1)):
        offset = len(seq.group(2)) - len(seq.group(1))
    return mapping, mapping + offset, offset


def _yaml(indent: tuple[int, int, int] = (2, 2, 0)) -> YAML:
    # Imported here: every `tether` command builds this parser, the sidecar's start included.
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    yaml.width = 1 << 16  # never fold a long value (the injection record is one JSON line)
    mapping, sequence, offset = indent
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def split_documents(text: str) -> list[_Document]:
    """The stream's documents, each parsed alone. A `---` line (a comment may follow) at the
    start of a line separates them; YAML allows no other line to begin with `---` there
    except inside a quoted scalar, which then fails to parse with the parser's message."""
    marks = list(_SEPARATOR.finditer(text))
    bounds = [(0, "", 0)] + [(m.start(), m.group(0), m.end() + 1) for m in marks]
    docs: list[_Document] = []
    for i, (start, separator, body_start) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        body = text[min(body_start, end) : end] if separator else text[start:end]
        if not separator and not body:
            continue
        indent = _guess_indent(body)
        docs.append(_Document(separator, body, _yaml(indent).load(body), indent))
    return docs


def join_documents(docs: list[_Document]) -> str:
    out = io.StringIO()
    for doc in docs:
        if doc.separator:
            out.write(doc.separator + "\n")
        if doc.new is None or doc.new == doc.obj:
            out.write(doc.text)
        else:
            _yaml(doc.indent).dump(doc.new, out)
    return out.getvalue()


def _objects(docs: list[_Document]) -> list[_Document]:
    return [d for d in docs if isinstance(d.obj, Mapping)]


def inject_stream(
    text: str, config: InjectConfig, *, force: bool, namespace: str | None = None
) -> str:
    """Rule 1 over a YAML stream; raises InjectError or YAMLError. `namespace` is where
    objects that name none will be applied (`kubectl apply -n`)."""
    everything = split_documents(text)
    docs = _objects(everything)
    for doc in docs:
        doc.new = inject(doc.obj, config, force=force, namespace=namespace)
    workloads = [(d, w) for d in docs if (w := injected_workload(d.new))]
    services = [d for d in docs if d.obj.get("kind") == "Service"]
    for doc, workload in workloads:
        hosts = [
            name
            for s in services
            if selects(s.obj, workload)
            for name in service_host_names(s.obj, workload.namespace or namespace)
        ]
        if hosts:
            doc.new = inject(doc.obj, config, force=force, namespace=namespace, allowed_hosts=hosts)
    for s in services:
        s.new = retarget_service(s.obj, [w for _, w in workloads])
    return join_documents(everything)


def uninject_stream(text: str) -> str:
    """Rule 2 over a YAML stream; raises InjectError or YAMLError."""
    docs = split_documents(text)
    for doc in _objects(docs):
        doc.new = restore_service(uninject(doc.obj))
    return join_documents(docs)


def _config(args: argparse.Namespace) -> InjectConfig:
    return dataclasses.replace(
        _DEFAULTS,
        image=args.image,
        control_plane=args.control_plane,
        home_namespace=args.home_namespace,
        proxy_port=args.proxy_port,
        admin_port=args.admin_port,
        drain_timeout_s=args.drain_timeout,
        allowed_hosts=(*_DEFAULTS.allowed_hosts, *(args.allowed_host or [])),
        token_audience=args.token_audience or None,
        fingerprint_key_secret=args.fingerprint_key_secret or None,
    )


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    return Path(name).read_text(encoding="utf-8")


def _runner(name: str, transform: Callable[[str, argparse.Namespace], str]) -> Any:
    def run(args: argparse.Namespace) -> int:
        from ruamel.yaml.error import YAMLError

        try:
            out = transform(_read(args.filename), args)
        except (InjectError, YAMLError, OSError, UnicodeDecodeError) as exc:
            message = " ".join(str(exc).split())  # one line, even for the parser's messages
            print(f"tether {name}: error: {message}", file=sys.stderr)
            return 1
        sys.stdout.write(out)
        sys.stdout.flush()
        return 0

    return run


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port")
    return port


def add_inject_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "inject",
        help="add the Tether sidecar to the workloads of a YAML stream (offline)",
        description="Writes the YAML back with Tether injected into every workload marked "
        'tether.dev/inject: "true" (every one with --all) and every Service that selects one '
        "sent to the sidecar's port. Comments and document order are kept.",
    )
    p.add_argument("-f", "--filename", required=True, help="YAML file, or - for standard input")
    p.add_argument(
        "-n",
        "--namespace",
        help="where objects that name no namespace will be applied (kubectl apply -n): their "
        "sidecars then accept the Services' namespaced names and know their owner name's form",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="inject workloads without the opt-in too (not those "
        'marked tether.dev/inject: "false")',
    )
    p.add_argument("--image", default=_DEFAULTS.image, help="the sidecar's image")
    p.add_argument(
        "--control-plane", default=_DEFAULTS.control_plane, help="HOST:PORT of the control plane"
    )
    p.add_argument(
        "--home-namespace",
        default=_DEFAULTS.home_namespace,
        help="the control plane's --home-namespace (pods elsewhere act as <pod>@<namespace>)",
    )
    p.add_argument("--proxy-port", type=_port, default=_DEFAULTS.proxy_port)
    p.add_argument("--admin-port", type=_port, default=_DEFAULTS.admin_port)
    p.add_argument(
        "--drain-timeout",
        type=int,
        default=_DEFAULTS.drain_timeout_s,
        help="seconds a pod's drain may wait for calls in flight (the grace period grows by it)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        help="a Host name clients use besides the Services' (repeatable; an ingress's, say)",
    )
    p.add_argument(
        "--token-audience",
        default="",
        help="prove the pod to the control plane with a projected token of this audience",
    )
    p.add_argument(
        "--fingerprint-key-secret",
        default="",
        help="Secret (key `key`, in the workload's namespace) that keys credential fingerprints",
    )
    p.set_defaults(
        run=_runner(
            "inject",
            lambda text, a: inject_stream(text, _config(a), force=a.all, namespace=a.namespace),
        )
    )

    u = sub.add_parser(
        "uninject",
        help="take the Tether sidecar out of a YAML stream `tether inject` wrote (offline)",
        description="Writes the YAML back as it was before `tether inject`.",
    )
    u.add_argument("-f", "--filename", required=True, help="YAML file, or - for standard input")
    u.set_defaults(run=_runner("uninject", lambda text, _: uninject_stream(text)))
