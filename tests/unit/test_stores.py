"""What the operator remembers about the store: commits for a while, never past a quarantine."""

from __future__ import annotations

from typing import Any, cast

import pytest

from llmengine.api.artifacts import StoreLocation
from llmengine.reconcile import stores as st

LOC = StoreLocation(bucket="engines")
ACCESS = st.StoreAccess(LOC, None, explicit=False, default=True)


class FakeStore:
    def __init__(self) -> None:
        self.committed = True
        self.asked = 0

    def is_committed(self, digest: str) -> bool:
        self.asked += 1
        return self.committed

    def quarantine_engine(self, digest: str, reason: str) -> str:
        self.committed = False
        return "quarantine/x-manifest.json"


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> tuple[st.Stores, FakeStore, list[float]]:
    now = [1000.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: now[0])
    s = st.Stores(cast(Any, None))
    fake = FakeStore()
    s._clients[(LOC, True)] = cast(Any, fake)
    return s, fake, now


async def test_a_commit_is_remembered_for_a_while_then_asked_again(stores: Any) -> None:
    s, fake, now = stores
    assert (await s.view("ml", ACCESS, "d")).committed and fake.asked == 1
    now[0] += st.COMMITTED_TTL_SECONDS - 1
    assert (await s.view("ml", ACCESS, "d")).committed and fake.asked == 1  # remembered
    fake.committed = False  # a person deleted the manifest
    now[0] += 2
    assert (await s.view("ml", ACCESS, "d")).committed is False and fake.asked == 2


async def test_a_quarantine_is_seen_at_once(stores: Any) -> None:
    s, fake, _ = stores
    assert (await s.view("ml", ACCESS, "d")).committed
    await s.quarantine("ml", ACCESS, "d", "rank0.engine failed verification")
    assert (await s.view("ml", ACCESS, "d")).committed is False and fake.asked == 2


class FakeKube:
    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets

    async def get_secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((ns, name))


async def test_one_client_per_location_and_credentials_whatever_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    monkeypatch.setattr(st, "make_s3_client", lambda cfg: made.append(cfg) or object())
    creds = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}
    other = {"AWS_ACCESS_KEY_ID": "b", "AWS_SECRET_ACCESS_KEY": "t"}
    kube = FakeKube({("team-a", "s3"): creds, ("team-b", "s3"): creds, ("team-c", "s3"): other})
    s = st.Stores(cast(Any, kube))
    explicit = st.StoreAccess(LOC, "s3", explicit=True, default=False)
    a = await s.client("team-a", explicit)
    assert await s.client("team-b", explicit) is a  # the same credentials in another namespace
    assert await s.client("team-c", explicit) is not a  # other credentials
    ambient = await s.client("team-a", ACCESS)
    assert await s.client("team-b", ACCESS) is ambient  # the operator's own credentials
    assert len(made) == 3


class CountingKube(FakeKube):
    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        super().__init__(secrets)
        self.reads = 0

    async def get_secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        self.reads += 1
        return await super().get_secret_data(ns, name)


async def test_a_credentials_secret_is_read_once_a_minute_and_again_after_the_store_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmengine.clients.store import CredentialsError

    now = [1000.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(st, "make_s3_client", lambda cfg: object())
    refusing = [False]

    class Store:
        def __init__(self, *a: Any, **kw: Any) -> None:
            pass

        def is_committed(self, digest: str) -> bool:
            if refusing[0]:
                raise CredentialsError("the store does not know this access key", setting="spec.store")
            return False  # building: asked on every pass

    monkeypatch.setattr(st, "EngineStore", Store)
    kube = CountingKube({})
    s = st.Stores(cast(Any, kube))
    explicit = st.StoreAccess(LOC, "s3", explicit=True, default=False)

    view = await s.view("team-a", explicit, "d")  # the Secret does not exist yet: not remembered as missing
    assert view.committed is None and "Secret 's3' not found" in (view.error or "") and kube.reads == 1
    kube.secrets[("team-a", "s3")] = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}
    assert (await s.view("team-a", explicit, "d")).committed is False and kube.reads == 2
    for _ in range(5):
        now[0] += 10
        assert (await s.view("team-a", explicit, "d")).committed is False
    assert kube.reads == 2  # passes within the minute: no read
    now[0] += st.SECRET_TTL_SECONDS
    await s.view("team-a", explicit, "d")
    assert kube.reads == 3  # a rotation is seen within a minute
    refusing[0] = True
    assert "does not know this access key" in ((await s.view("team-a", explicit, "d")).error or "")
    assert kube.reads == 3
    refusing[0] = False
    await s.view("team-a", explicit, "d")
    assert kube.reads == 4  # refused credentials are read again at once
