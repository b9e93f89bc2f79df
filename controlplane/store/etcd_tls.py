"""An aetcd client that speaks TLS (and mutual TLS) to etcd.

aetcd 1.x always opens a plaintext channel. This subclass opens a secure one in its own
`connect`, then authenticates (user/password) and builds aetcd's stubs and watcher on it
exactly as aetcd does, so the rest of aetcd works unchanged. It relies on aetcd 1.x's
connection attributes, which is why the dependency is pinned below 2.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher


class TlsEtcdClient(aetcd.Client):  # type: ignore[misc]
    # aetcd's own connection attributes (it ships no type information).
    _connected: asyncio.Event
    _is_connecting: bool
    _connect_wait_timeout: float
    _host: str
    _port: int
    _options: dict[str, Any]
    _username: str | None
    _password: str | None
    _timeout: float | None

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            self.channel = grpc.aio.secure_channel(
                target, self._credentials, options=list(self._options.items())
            )
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout,
                )
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False
