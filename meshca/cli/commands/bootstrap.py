"""``meshca bootstrap``: an Envoy bootstrap that gets its certificates (and, with ``--ads``,
its whole configuration) from ``meshca serve``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from meshca.cli.commands.common import Command, UsageError, arg, write_out
from meshca.cli.options import ConfigError, Settings, option
from meshca.spiffe import SpiffeId
from meshca.util.files import PUBLIC, atomic_write
from meshca.util.netaddr import AddressError, TcpServer

if TYPE_CHECKING:  # the Envoy modules load when this command runs, not with every command
    from meshca.envoy.bootstrap import BootstrapSpec

NAME = "bootstrap"


ADS_ONLY = ("capture", "layout", "workload", "delta")


def _check_shape(args: argparse.Namespace, settings: Settings) -> None:
    if settings["ads"]:
        for given, flag in ((args.inbound, "--inbound"), (args.outbound, "--outbound")):
            if given is not None:
                raise UsageError(
                    f"{flag} does not apply to --ads: meshca sends the listeners and clusters"
                )
        return
    for name in ADS_ONLY:
        flag = option(name).flag_name
        if settings.source(name) == flag:  # from the environment or a file: not for this run
            raise UsageError(f"{flag} applies to --ads")


def _spec(args: argparse.Namespace, settings: Settings) -> BootstrapSpec:
    from meshca.envoy.bootstrap import (
        BootstrapSpec,
        ClientTls,
        default_server_id,
        parse_inbound,
        parse_outbound,
    )

    _check_shape(args, settings)
    identity = SpiffeId.parse(args.identity)
    if settings.is_explicit("trust_domain") and settings["trust_domain"] != identity.trust_domain:
        raise ConfigError(
            f"{identity} is not in trust domain {settings['trust_domain']} "
            f"({settings.source('trust_domain')})"
        )
    server = settings["server"]
    agent = settings["agent"]
    if agent is not None:
        if server is not None:
            raise UsageError("give --server or --agent, not both")
        if isinstance(agent, TcpServer):
            raise UsageError(
                f"--agent {agent}: meshca agent listens on a Unix socket (unix:///path)"
            )
        server = agent
    if server is None:
        raise UsageError(
            "give --server (unix:///path/to/meshca.sock or HOST:PORT) or --agent "
            f"unix:///path (see 'meshca {NAME} --help')"
        )
    if args.allow and args.inbound is None:
        raise UsageError("--allow applies to --inbound")
    if args.upstream_id is not None and args.outbound is None:
        raise UsageError("--upstream-id applies to --outbound")
    cert_dir = settings["cert_dir"]
    client_tls = None
    if isinstance(server, TcpServer):
        if cert_dir is None:
            raise UsageError(
                f"--server {server} is TCP, where meshca requires a client certificate: "
                "give --cert-dir with the files of 'meshca issue IDENTITY --out DIR'"
            )
        client_tls = ClientTls.from_dir(cert_dir, identity)
    server_id = settings["server_id"] or default_server_id(
        identity.trust_domain, settings["server_namespace"]
    )
    return BootstrapSpec(
        identity=identity,
        server=server,
        client_tls=client_tls,
        server_id=server_id,
        admin_port=settings["admin_port"],
        inbound=parse_inbound(args.inbound, tuple(args.allow)) if args.inbound else None,
        outbound=parse_outbound(args.outbound, args.upstream_id) if args.outbound else None,
    )


def _render(args: argparse.Namespace, settings: Settings) -> str:
    from meshca.envoy.bootstrap import render_bootstrap

    spec = _spec(args, settings)
    if not settings["ads"]:
        return render_bootstrap(spec)
    from meshca.envoy.ads_bootstrap import render_ads_bootstrap  # loads the Envoy API

    return render_ads_bootstrap(
        spec,
        capture=settings["capture"],
        workload=settings["workload"],
        delta=settings["delta"],
        layout=settings["layout"],
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.envoy.bootstrap import BootstrapError

    try:
        text = _render(args, settings)
    except (BootstrapError, AddressError) as exc:
        raise ConfigError(str(exc)) from None
    if args.out is None:
        write_out(text)
        return 0
    atomic_write(args.out, text.encode(), PUBLIC)  # paths only: no key material inside
    write_out(f"Wrote the Envoy bootstrap for {args.identity} to {args.out}\n")
    # Without --disable-hot-restart a second Envoy on the machine cannot bind base id 0.
    write_out(f"  run: envoy -c {args.out} --disable-hot-restart\n")
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "Write an Envoy bootstrap (YAML) for IDENTITY whose static cluster "
        "'meshca_sds' reaches meshca over its Unix socket (--server unix:///path) or "
        "over mutual TLS (--server HOST:PORT with --cert-dir from 'meshca issue'; "
        "only meshca's own SPIFFE ID is accepted from the server). --inbound and "
        "--outbound add a minimal listener pair for trying it out. With --ads that "
        "cluster is the only static piece: listeners, clusters, routes, endpoints and "
        "secrets come from meshca over ADS, generated from its mesh file for IDENTITY "
        "(--capture says how traffic reaches the proxy)."
    ),
    arguments=(
        arg("identity", metavar="IDENTITY", help="the SPIFFE ID this Envoy serves"),
        arg("--out", type=Path, metavar="FILE", help="write here (default stdout)"),
        arg(
            "--inbound",
            metavar="PORT:APP_PORT",
            help="add an mTLS listener on 127.0.0.1:PORT forwarding to a local app on APP_PORT",
        ),
        arg(
            "--allow",
            action="append",
            default=[],
            metavar="ID",
            help="with --inbound: a client identity to admit (repeatable; default any in the "
            "trust domain)",
        ),
        arg(
            "--outbound",
            metavar="PORT:HOST:PORT",
            help="add a plain HTTP listener on 127.0.0.1:PORT forwarding over mTLS to HOST:PORT",
        ),
        arg(
            "--upstream-id",
            metavar="ID",
            help="with --outbound: the identity the upstream must have",
        ),
    ),
)
