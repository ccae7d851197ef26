"""Publishing a new version to TF Serving without a moment of unavailability (the role of TFX's Pusher).

TF Serving refuses a version label on a version that is not AVAILABLE (server_core.cc
``UpdateModelVersionLabelMap``; with ``--allow_version_labels_for_unavailable_models`` only for a label that is
new or keeps its version), so moving ``stable`` to a new version takes two phases:

1. **Load**: the new version is added to the model's ``specific`` version policy in ``models.config`` (written
   atomically) and, when a server address is given, applied at once with ``ModelService/HandleReloadConfigRequest``
   (the file stays the truth: a server polling it with ``--model_config_file_poll_wait_seconds`` reads the same).
   Labels are unchanged, so the config is valid whatever has loaded. The server loads the version at its next
   file-system poll, warmup included, while the old versions keep answering (availability-preserving policy).
2. **Wait** until ``GetModelStatus`` says AVAILABLE (a load that ends with an error stops here: the version is
   taken out of the policy again and ``PromotionError`` names the server's error; ``stable`` never moved).
3. **Label**: ``canary`` and ``stable`` move to the new version in one reload.
4. **Retention**: versions beyond the newest ``keep`` leave the policy (another reload); their directories are
   deleted once the server reports them END (unloaded), so a version is never deleted under a server using it.

Without a server address (``target=None``, e.g. before the first ``docker compose up``) the config is written
with the version and labels at once: at start-up TF Serving accepts labels on versions it will load when
started with ``--allow_version_labels_for_unavailable_models`` (the compose files pass it).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from serving import tf_serving_config as tsc

logger = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """The new version did not become AVAILABLE (or the server refused a config); ``stable`` did not move."""


def read_config(path: str):
    from tensorflow_serving.config import model_server_config_pb2

    with open(path, encoding="utf-8") as fh:
        return tsc.parse_text(fh.read(), model_server_config_pb2.ModelServerConfig, path)


def _entry(config, model_name: str):
    for entry in config.model_config_list.config:
        if entry.name == model_name:
            return entry
    raise PromotionError(f"model {model_name!r} is not in the model config "
                         f"(has {[e.name for e in config.model_config_list.config]})")


def served_versions(config, model_name: str) -> List[int]:
    entry = _entry(config, model_name)
    if entry.model_version_policy.WhichOneof("policy_choice") != "specific":
        raise PromotionError(f"model {model_name!r}: promotion needs a 'specific' version policy (exactly the "
                             "listed versions are served), not "
                             f"{entry.model_version_policy.WhichOneof('policy_choice') or 'latest (the default)'}")
    return sorted(entry.model_version_policy.specific.versions)


def with_versions(config, model_name: str, versions: Sequence[int], labels: Optional[Mapping[str, int]] = None):
    """A copy of ``config`` whose ``model_name`` serves exactly ``versions`` (and ``labels``, when given)."""
    from tensorflow_serving.config import model_server_config_pb2

    out = model_server_config_pb2.ModelServerConfig()
    out.CopyFrom(config)
    entry = _entry(out, model_name)
    del entry.model_version_policy.specific.versions[:]
    entry.model_version_policy.specific.versions.extend(sorted({int(v) for v in versions}))
    if labels is not None:
        entry.version_labels.clear()
        for label, version in labels.items():
            entry.version_labels[label] = int(version)
    return out


class Promoter:
    """Two-phase promotion of versions of ``model_name`` listed in ``config_path``.

    ``target``: the server's gRPC address (None: write the file only). ``export_base``: the local directory
    holding the model's version directories (for retention; None: nothing is deleted).
    """

    def __init__(self, config_path: str, model_name: str, target: Optional[str] = None,
                 export_base: Optional[str] = None, timeout_s: float = 300.0, poll_s: float = 0.5,
                 client_kwargs: Optional[Dict] = None, log: Callable[[str], None] = logger.info):
        self.config_path, self.model_name, self.target = config_path, model_name, target
        self.export_base, self.timeout_s, self.poll_s = export_base, float(timeout_s), float(poll_s)
        self.client_kwargs = dict(client_kwargs or {})
        self.log = log

    # ---- plumbing ------------------------------------------------------------------------------
    def _client(self):
        from serving.client import TFServingClient

        return TFServingClient(self.target, self.model_name, **self.client_kwargs)

    def apply(self, config) -> None:
        """Writes ``config`` atomically, then (with a server) applies it by HandleReloadConfigRequest; a config the
        server refuses is taken out of the file again (a server polling the file would retry it) and raised."""
        previous = open(self.config_path, encoding="utf-8").read() if os.path.exists(self.config_path) else None
        tsc.write_text_atomic(self.config_path, tsc.to_text(config))
        if self.target is None:
            return
        import grpc
        from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

        # model_service_impl.cc: the ReloadConfig status is both the response's status and the RPC's status.
        try:
            with self._client() as client:
                stub = model_service_pb2_grpc.ModelServiceStub(client.channel)
                response = stub.HandleReloadConfigRequest(
                    model_management_pb2.ReloadConfigRequest(config=config), timeout=min(self.timeout_s, 60.0))
            error = response.status.error_message if response.status.error_code else None
        except grpc.RpcError as exc:
            error = f"{exc.details()} ({exc.code().name})"
        if error:
            if previous is not None:
                tsc.write_text_atomic(self.config_path, previous)
            raise PromotionError(f"TF Serving refused the model config: {error}")

    def status(self) -> Dict[int, tuple]:
        with self._client() as client:
            return client.model_status(timeout_s=min(self.timeout_s, 30.0))

    def _wait(self, done: Callable[[Dict[int, tuple]], Optional[bool]], what: str) -> Dict[int, tuple]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                states = self.status()
            except Exception as exc:  # noqa: BLE001  (a server restarting or a model not yet known)
                states, error = {}, exc
            else:
                error = None
                verdict = done(states)
                if verdict is not None:
                    return states
            if time.monotonic() >= deadline:
                raise PromotionError(f"timed out after {self.timeout_s:.0f} s waiting for {what} "
                                     f"(last status: {states or error})")
            time.sleep(self.poll_s)

    # ---- the steps -----------------------------------------------------------------------------
    def promote(self, version: int, keep: int = 2, labels: Sequence[str] = ("canary", "stable")) -> Dict:
        """Serves ``version`` and moves ``labels`` to it; keeps the newest ``keep`` versions. Returns a record
        of what was done (versions before/after, deleted directories, seconds per phase)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        version = int(version)
        config = read_config(self.config_path)
        before = served_versions(config, self.model_name)
        old_labels = dict(_entry(config, self.model_name).version_labels)
        moved = dict(old_labels, **{label: version for label in labels})  # the labels once promoted
        served = sorted(set(before) | {version})  # the versions while the new one loads
        record = {"version": version, "versions_before": before, "labels_before": old_labels, "seconds": {}}
        started = time.monotonic()
        if self.target is None:
            versions = served[-keep:]
            self.apply(with_versions(config, self.model_name, versions, moved))
            record.update(versions_after=versions, deleted=[], mode="file only")
            return record
        # 1. load: the version joins the policy, labels untouched
        loading = with_versions(config, self.model_name, served)
        self.apply(loading)
        self.log(f"promote: version {version} added to {os.path.basename(self.config_path)}; waiting for AVAILABLE")

        # 2. wait for AVAILABLE (END with an error: roll the policy back and stop)
        def loaded(states):
            state, error = states.get(version, (None, ""))
            if state == "AVAILABLE":
                return True
            if state == "END":
                self.apply(config)
                raise PromotionError(f"version {version} of {self.model_name} failed to load: "
                                     f"{error or 'END without AVAILABLE'}; stable stays at {old_labels.get('stable')}")
            return None

        self._wait(loaded, f"version {version} to be AVAILABLE")
        record["seconds"]["load"] = round(time.monotonic() - started, 2)
        # 3. labels move to the loaded version
        labelled = with_versions(loading, self.model_name, served, moved)
        self.apply(labelled)
        self.log(f"promote: {', '.join(labels)} -> version {version}")
        # 4. retention: drop the oldest versions from the policy, delete them once unloaded
        keep_versions = served[-keep:]
        retired = [v for v in served if v not in keep_versions]
        labels_after = {k: v for k, v in moved.items() if v in keep_versions}
        deleted: List[str] = []
        if retired:
            self.apply(with_versions(labelled, self.model_name, keep_versions, labels_after))
            self._wait(lambda s: True if all(s.get(v, ("END",))[0] == "END" for v in retired) else None,
                       f"versions {retired} to unload")
            for v in retired:
                path = os.path.join(self.export_base, str(v)) if self.export_base else None
                if path and os.path.isdir(path):
                    shutil.rmtree(path)
                    deleted.append(path)
        record.update(versions_after=keep_versions, labels_after=labels_after, retired=retired, deleted=deleted,
                      mode="two-phase")
        record["seconds"]["total"] = round(time.monotonic() - started, 2)
        return record
