"""Carries out the update (docs/PROTOCOL.md, section 10): check, pull, swap, verify,
commit or roll back, recover.

The update is journalled in the agent state before every step that changes Docker,
and the container names tell the rest: ``<name>-next`` is a new container not yet in
place, ``<name>-previous`` the old one kept until the new one has proven itself.
After a crash, ``recover()`` finishes or undoes whatever it finds.

Every failure ends with the old container serving: before the old container is stopped
the update is undone and the error reported (retried at the next check); after it, a
new container that Docker refuses to start, or that fails verification, is rolled back
and its image remembered as failed for this desired tag and docker_config.json (with no
previous container, one that would not start stays in place and is started again at
each check). When the daemon itself is gone mid-update, ``recover()`` undoes the update
once it answers again.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.agent.config import Settings
from edge_agent.agent.deferral import Deferral
from edge_agent.agent.engine import (
    LABEL_CONFIG,
    LABEL_DIGEST,
    LABEL_TAG,
    ContainerInfo,
    Engine,
    ImageInfo,
)
from edge_agent.agent.errors import (
    DockerOperationError,
    InsufficientSpace,
    ManifestUnknown,
    RegistryError,
    SignatureRefused,
)
from edge_agent.agent.reconcile import (
    MAX_INTERRUPTED,
    Action,
    Desired,
    Found,
    Probe,
    Recovery,
    Running,
    Target,
    Verdict,
    attempt,
    counts_as_interrupted,
    decide,
    failed_keys,
    failure_of,
    interruptions,
    judge,
    plan_recovery,
    relevant_attempts,
)
from edge_agent.agent.registry import RegistryClient, in_container
from edge_agent.agent.signatures import BadSignature
from edge_agent.agent.space import (
    OFF,
    DataRoot,
    ImageLayers,
    Platform,
    data_root,
    download_bytes,
    free_bytes,
    make_room,
    megabytes,
    room_needed,
)
from edge_agent.agent.status import FallbackView, RunningView, Status
from edge_agent.agent.store import AgentState, DataDir, ImageRef, PendingUpdate, RunConfig
from edge_agent.protocol.errors import EdgeAgentError
from edge_agent.protocol.events import CheckOutcome, EventName
from edge_agent.protocol.state import UpdateStatus
from edge_agent.protocol.tags import is_digest
from edge_agent.protocol.timestamps import utc_now

if TYPE_CHECKING:
    from edge_agent.agent.trust import TrustedKeys

log = logging.getLogger(__name__)

VERIFY_POLL_S = 0.2
# Verified digests remembered in the state (the newest; current, previous and a few more)
MAX_VERIFIED = 16
# Fault injection for the crash tests: SIGKILL ourselves when this step is reached.
KILL_AT_ENV = "EDGE_AGENT_TEST_KILL_AT"


@dataclass(frozen=True)
class CheckResult:
    """What a check did, for the caller (and the bridge's ?wait) to report."""

    action: Action
    outcome: CheckOutcome
    target: Target


class Updater:
    """Keeps the container named ``settings.container_name`` at the desired target."""

    def __init__(  # noqa: PLR0913, PLR0917 - the agent's parts, injected
        self,
        settings: Settings,
        engine: Engine,
        registry: RegistryClient,
        data: DataDir,
        state: AgentState,
        status: Status,
        should_abort: Callable[[], bool] = lambda: False,
        gate: Callable[[str], Deferral | None] = lambda _tag: None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.data = data
        self.state = state
        self.status = status
        self.should_abort = should_abort
        # Whether an update to a tag must wait (window, app lock; agent/deferral.py)
        self.gate = gate
        self.name = settings.container_name
        self.next_name = f"{self.name}-next"
        self.previous_name = f"{self.name}-previous"
        self._kill_at = os.environ.get(KILL_AT_ENV)
        self._start_reported: str | None = None  # the container last reported as not running
        self._recovering = False
        # For tests: called with the step name at every failpoint (e.g. to stop a daemon).
        self.step_hook: Callable[[str], None] | None = None
        self._recovered = False
        # Images of this repository other than current and previous may be lying around:
        # at start, and after any update that did not commit (rollback, crash, bad config).
        self._prune_due = True
        self._warned_config: str | None = None  # docker_config.json whose warnings were said
        self._local_decision: str | None = None  # the registry error last decided around
        # Room for a pull: where Docker's data root is seen (asked once), the platform,
        # the last image's layers (a refused update asks again at every check), and why
        # free space could not be checked, said once.
        self._data_root: DataRoot | None = None
        self._platform = Platform("linux", "amd64")
        self._layers: tuple[str, ImageLayers] | None = None
        self._room_unknown: str | None = None
        # TRUSTED_KEYS: cryptography is imported only when keys are set (its RSS)
        self._trust: TrustedKeys | None = None
        if settings.trusted_keys:
            from edge_agent.agent.trust import load_trusted_keys  # noqa: PLC0415

            self._trust = load_trusted_keys(settings.trusted_keys)
        # Signature refusals by (desired tag, digest): not asked again until either changes
        self._refused: dict[tuple[str, str], str] = {}

    # -- check ------------------------------------------------------------------
    def check(self, desired: Desired, *, install: bool = False) -> CheckResult:
        """One reconcile pass. Raises RegistryError, RunConfigError, Docker errors."""
        if not self._recovered or self.state.pending is not None:
            # At start, and after an update that a fault (daemon gone, disk error) broke off.
            self.recover()
            self._recovered = True
        self.status.last_check_at = utc_now()
        self.status.set_update(UpdateStatus.CHECKING)
        run_config = self.data.read_run_config()
        self.engine.validate_run_kwargs(run_config.kwargs)
        # The same file gives the same warnings at every check: said once per content.
        if run_config.warnings and run_config.digest != self._warned_config:
            for warning in run_config.warnings:
                log.warning("%s", warning)
        self._warned_config = run_config.digest if run_config.warnings else None
        # Failed and broken-off attempts hold only for the desired tag and the
        # docker_config.json they were made under: a change of either is worth a new try.
        self.state.failed = relevant_attempts(self.state.failed, desired.tag, run_config.digest)
        self.state.interrupted = relevant_attempts(self.state.interrupted, desired.tag,
                                                   run_config.digest)
        current = self.engine.container(self.name)
        self.status.running = self.view(current)
        target = self._resolve_target(desired)
        self._show_fallback(desired, target)
        failed = failed_keys(self.state.failed, desired.tag, run_config.digest)
        action = decide(target, self._running(current), run_config.digest, failed)

        if action is Action.NOTHING:
            self._start_reported = None
            self._remember_applied(target, current)
            if self._prune_due and current is not None and current.running:
                self._prune()
            self._finish_check(latest=target.tag, error=target.registry_error)
            return CheckResult(action, CheckOutcome.UNCHANGED, target)
        if action is Action.START:
            assert current is not None
            # Once per container until it is seen running: one that never starts, or
            # exits at once every time, is a repeated condition, not news at every check.
            if self._start_reported != current.id:
                log.warning("container %s is %s; starting it", self.name, current.status)
                self.status.event(EventName.CONTAINER_EXITED, status=current.status,
                                  exit_code=current.exit_code, action="started")
                self._start_reported = current.id
            self.engine.start(current.id)
            self._finish_check(latest=target.tag)
            return CheckResult(action, CheckOutcome.STARTED, target)
        if action is Action.SKIP_FAILED:
            assert target.key is not None
            why = failure_of(self.state.failed, desired.tag, run_config.digest, target.key)
            if self._prune_due and current is not None and current.running:
                self._prune()  # the image that failed is of no use
            self._finish_check(
                latest=target.tag,
                error=f"{target.tag} ({target.key}) failed verification before: {why}; "
                "waiting for a new digest, desired tag or docker_config.json",
            )
            return CheckResult(action, CheckOutcome.SKIPPED, target)
        if self._trust is not None:
            # before notify, deferral and pull: an image not signed is not even offered
            self._check_signature(desired, target, self._trust)
        if self.settings.update_mode == "notify" and not install:
            log.info("update to %s available; waiting for install", target.tag)
            self.status.latest_version = target.tag
            self.status.set_update(UpdateStatus.AVAILABLE)
            return CheckResult(action, CheckOutcome.AVAILABLE, target)
        # Only a running app has work to protect: a missing or stopped one is replaced now.
        deferral = self.gate(target.tag) if current is not None and current.running else None
        if deferral is not None:
            self.status.last_error = target.registry_error
            self.status.defer(deferral)
            return CheckResult(action, CheckOutcome.DEFERRED, target)
        outcome = self._update(desired, target, current, run_config)
        return CheckResult(action, outcome, target)

    # -- signatures (TRUSTED_KEYS) -------------------------------------------------
    def _check_signature(self, desired: Desired, target: Target, trust: TrustedKeys) -> None:
        """Let ``target`` run only with a valid signature by a trusted key for exactly its
        digest and this repository (docs/SIGNING.md); SignatureRefused otherwise. Asked
        once per digest: a verified one is remembered in the state, a refused one until
        the digest or the desired tag changes."""
        self._refused = {k: v for k, v in self._refused.items() if k[0] == desired.tag}
        digest = target.digest
        if digest is None:
            # decided from a local image (registry away or tag unknown): only a digest
            # verified before may run
            local = self._local_image(target.tag)
            known = local.digests_for(self.settings.repository) if local else frozenset()
            if any(self._was_verified(d, trust) for d in known):
                return
            raise SignatureRefused(
                f"signature check refused {target.tag}: no registry digest to verify "
                f"({target.registry_error or 'the image is only known locally'}); the "
                "current container keeps running", tag=target.tag, digest=None)
        if self._was_verified(digest, trust):
            return
        why = self._refused.get((desired.tag, digest))
        if why is None:
            why = self._signature_problem(digest, trust)
            if why is None:
                self._remember_verified(digest, trust)
                return
            self._refused[(desired.tag, digest)] = why
        raise SignatureRefused(
            f"signature check refused {target.tag} ({digest}): {why}; the current container "
            "keeps running; not retried until the digest or the desired tag changes",
            tag=target.tag, digest=digest)

    def _signature_problem(self, digest: str, trust: TrustedKeys) -> str | None:
        """None when a trusted key signed ``digest`` for this repository, else why not.
        RegistryError (retried) when the registry cannot say."""
        try:
            signed = self.registry.signatures(digest)
        except ManifestUnknown:
            return "not signed (the registry holds no signature for this digest)"
        except BadSignature as exc:
            return str(exc)
        from edge_agent.agent.trust import judge_signatures  # noqa: PLC0415 - with keys only

        signer, problem = judge_signatures(signed, trust, repository=self.settings.repository,
                                           digest=digest)
        if signer is not None:
            log.info("signature of %s verified: key %s (%s)", digest, signer.fingerprint,
                     signer.path)
        return problem

    def _was_verified(self, digest: str, trust: TrustedKeys) -> bool:
        return any(r.get("digest") == digest and r.get("keys") == trust.fingerprint
                   and r.get("repository") == self.settings.repository
                   for r in self.state.verified)

    def _remember_verified(self, digest: str, trust: TrustedKeys) -> None:
        record = {"digest": digest, "keys": trust.fingerprint,
                  "repository": self.settings.repository}
        kept = [r for r in self.state.verified if r.get("keys") == trust.fingerprint]
        self.state.verified = [*kept, record][-MAX_VERIFIED:]
        self.data.save_state(self.state)

    def _finish_check(self, *, latest: str, error: str | None = None) -> None:
        self.status.latest_version = latest
        self.status.last_error = error
        self.observe()
        self.status.set_update(UpdateStatus.IDLE)

    def _resolve_target(self, desired: Desired) -> Target:
        """Ask the registry what to run; fall back or use a local image when it cannot say."""
        tag = desired.tag
        if is_digest(tag) and self._local_image(tag) is not None:
            # a pinned digest that is already here cannot have moved: no question to ask
            self.status.registry_answered_at = utc_now()
            return Target(tag, tag)
        try:
            target = Target(tag, self.registry.digest(tag))
            self._local_decision = None
            self.status.registry_answered_at = utc_now()
            return target
        except ManifestUnknown:
            self._local_decision = None
            self.status.registry_answered_at = utc_now()
            local = self._local_image(tag)
            if local is not None:
                log.info("%s is not in the registry but exists locally; using it", tag)
                return Target(tag, None, image_id=local.id)
            fallback = self.settings.fallback_tag
            if not fallback or fallback == tag:
                raise
            reason = f"tag {tag} not found in registry (manifest unknown)"
            return Target(fallback, self.registry.digest(fallback), fallback_reason=reason)
        except RegistryError as exc:
            local = self._local_image(tag)
            if local is None:
                raise
            said = f"{exc} {tag}"
            # An unreachable registry stays so for many checks: said when it starts or changes.
            log.log(logging.DEBUG if said == self._local_decision else logging.WARNING,
                    "%s; deciding with the local image of %s", exc, tag)
            self._local_decision = said
            return Target(tag, None, registry_error=str(exc), image_id=local.id)

    def _local_image(self, tag: str) -> ImageInfo | None:
        separator = "@" if is_digest(tag) else ":"
        return self.engine.image(f"{self.settings.repository}{separator}{tag}")

    def _show_fallback(self, desired: Desired, target: Target) -> None:
        if target.fallback_reason is None:
            self.status.fallback = FallbackView()
            return
        already = self.status.fallback
        self.status.fallback = FallbackView(True, desired.tag, target.fallback_reason)
        if not already.active or already.requested_tag != desired.tag:
            log.warning("fallback: %s; running %s", target.fallback_reason, target.tag)
            self.status.event(EventName.FALLBACK, requested_tag=desired.tag, tag=target.tag,
                              reason=target.fallback_reason)

    def _running(self, container: ContainerInfo | None) -> Running | None:
        if container is None:
            return None
        digests = set()
        if LABEL_DIGEST in container.labels:
            digests.add(container.labels[LABEL_DIGEST])
        image = self.engine.image(container.image_id)
        if image is not None:
            digests |= image.digests_for(self.settings.repository)
        return Running(
            digests=frozenset(digests),
            tag=container.tag,
            config_digest=container.config_digest,
            running=container.running,
        )

    def _remember_applied(self, target: Target, container: ContainerInfo | None) -> None:
        """Adopted or unchanged: make the state say what runs (e.g. after adopting)."""
        if container is None:
            return
        applied = self.state.applied
        if applied is None or applied.image_id != container.image_id or applied.tag != target.tag:
            if applied is None:
                # A container the agent did not start (or whose record was lost) is kept.
                log.info("adopted the running container %s (%s, image %s) as %s", self.name,
                         container.id[:12], container.image_id[:19], target.tag)
            self.state.applied = ImageRef(target.tag, target.digest, container.image_id)
            self.data.save_state(self.state)

    # -- update -----------------------------------------------------------------
    def _update(
        self, desired: Desired, target: Target, current: ContainerInfo | None,
        run_config: RunConfig,
    ) -> CheckOutcome:
        from_tag = self.status.running.tag
        if target.digest is not None and self._pulled_already(target) is None:
            # before the update starts: a refusal leaves everything as it is
            self._check_room(target, current)
        if current is None:
            log.info("installing %s: %s (%s), no container yet", self.name, target.tag,
                     target.digest)
        elif from_tag == target.tag and current.config_digest != run_config.digest:
            log.info("recreating %s at %s: docker_config.json changed", self.name, target.tag)
        else:
            log.info("updating %s: %s -> %s (%s)", self.name, from_tag, target.tag,
                     target.digest)
        self.status.event(EventName.UPDATE_STARTED, from_tag=from_tag, to_tag=target.tag,
                          digest=target.digest)
        self.status.last_error = None
        # Home Assistant shows "up to date" when latest == installed, even in progress.
        self.status.latest_version = target.tag
        self._prune_due = True  # cleared by the prune of a commit
        image = self._ensure_image(target)
        self._failpoint("pulled")
        old_id = current.id if current else None
        pending = PendingUpdate(
            step="creating", target=ImageRef(target.tag, target.digest, image.id),
            old_container_id=old_id, request_id=desired.request_id, desired_tag=desired.tag,
            config_digest=run_config.digest,
        )
        self.state.pending = pending
        self.data.save_state(self.state)
        self.status.set_update(UpdateStatus.INSTALLING)
        try:
            new_id = self._create(target, run_config)
            # Renames first, while the old container still serves: the downtime is only
            # the gap between stopping the old container and starting the new one.
            if current is not None:
                self.engine.rename(current.id, self.previous_name)
                self._failpoint("renamed_old")
            self.engine.rename(new_id, self.name)
            self._failpoint("renamed_new")
            pending.step = "starting"
            self.data.save_state(self.state)
            if current is not None and current.running:
                self.engine.stop(current.id)
                self._failpoint("stopped")
        except EdgeAgentError:
            # Nothing is proven wrong with the image: put the old container back as it
            # was, report the error, try again at the next check.
            self._undo()
            raise
        try:
            self.engine.start(new_id)
        except EdgeAgentError as exc:
            # What the daemon shows decides: the answer to a start that worked may be lost
            # (a timeout). A daemon that does not answer at all proves nothing about the
            # image: recover() undoes the update once it is back.
            try:
                started = self._find(new_id)
            except EdgeAgentError:
                raise exc from None
            if started is not None and not started.running and old_id is None:
                self._keep_in_place()
                raise
            if started is None or not started.running:
                self._rollback(new_id, old_id, f"did not start: {exc}")
                return CheckOutcome.ROLLED_BACK
        pending.step = "verifying"
        self.data.save_state(self.state)
        self._failpoint("started")
        return self._verify_and_settle(new_id, old_id)

    def _create(self, target: Target, run_config: RunConfig) -> str:
        """Create ``<name>-next`` for ``target`` and journal its id."""
        pending = self.state.pending
        assert pending is not None
        self._remove_named(self.next_name)
        labels = {LABEL_TAG: target.tag, LABEL_CONFIG: run_config.digest}
        if target.digest:
            labels[LABEL_DIGEST] = target.digest
        new_id = self.engine.create(self._reference(target), self.next_name,
                                    run_config.kwargs, labels)
        pending.new_container_id = new_id
        pending.step = "swapping"
        self.data.save_state(self.state)
        self._failpoint("created")
        return new_id

    def _undo(self) -> None:
        """Undo an update that failed before it proved anything (best effort: when Docker
        cannot do it now, the journal stays and ``recover()`` does it at the next check)."""
        pending = self.state.pending
        assert pending is not None
        try:
            self._restore(self._find(pending.new_container_id),
                          self._find(pending.old_container_id))
        except EdgeAgentError as exc:
            log.debug("cannot undo the update now (%s); recovering at the next check", exc)
            return
        self.state.pending = None
        self.data.save_state(self.state)

    def _keep_in_place(self) -> None:
        """A first install that Docker would not start: there is nothing to go back to,
        so the container stays in place and every check starts it again (a port in use
        may be freed). The error is reported, and repeated, like any other."""
        pending = self.state.pending
        assert pending is not None
        log.warning("%s did not start and there is no previous container to go back to; "
                    "starting it again at every check", pending.target.tag)
        self.state.applied = pending.target
        self.state.pending = None
        self.data.save_state(self.state)
        self.observe()

    def _ensure_image(self, target: Target) -> ImageInfo:
        """The local image for ``target``, pulled (with progress) when not already here."""
        repo = self.settings.repository
        if target.digest is None:
            local = self._local_image(target.tag)
            if local is None:
                raise DockerOperationError(f"no local image for {repo}:{target.tag}")
            return local
        local = self._pulled_already(target)
        if local is not None:
            return local
        self.status.set_update(UpdateStatus.PULLING, progress=0.0)

        def on_progress(percent: float) -> None:
            self._failpoint("pulling")
            self.status.progress = percent
            self.status.event(EventName.PULL_PROGRESS, tag=target.tag, progress=percent)
            self.status.publish()

        return self.engine.pull(repo, target.tag, on_progress, self.should_abort)

    def _pulled_already(self, target: Target) -> ImageInfo | None:
        """The local image of ``target`` when a pull has nothing to do."""
        local = self.engine.image(f"{self.settings.repository}@{target.digest}")
        if local is not None and (is_digest(target.tag) or self._tag_points_at(target, local)):
            return local
        return None

    # -- room for the pull --------------------------------------------------------
    def _check_room(self, target: Target, current: ContainerInfo | None) -> None:
        """Does the pull fit on Docker's data root? Our own older images (neither running
        nor kept for rollback) are pruned first when it does not; InsufficientSpace, with
        nothing touched, when it still does not. Skipped (said once) when the agent
        cannot know; a pull that fails for lack of space anyway is reported as before."""
        assert target.digest is not None
        path = self._where_to_measure()
        layers = self._layers_of(target) if path is not None else None
        if path is None or layers is None:
            return

        def measure() -> tuple[int, int]:
            needed = room_needed(download_bytes(layers, self.engine.local_layers()))
            return needed, free_bytes(path) if needed else 0

        def prune() -> bool:
            keep = frozenset({current.image_id}) if current is not None else frozenset()
            return self._prune(keep) > 0

        try:
            room = make_room(measure, prune)
        except OSError as exc:
            self._cannot_check_room(f"cannot read the free space of {path}: "
                                    f"{exc.strerror or exc}")
            return
        self._room_unknown = None
        numbers = (f"needs about {megabytes(room.needed)} MB, "
                   f"{megabytes(room.free, up=False)} MB free on {path}")
        if room.fits:
            if room.pruned:
                log.info("pruned older images of %s to make room for %s: %s",
                         self.settings.repository, target.tag, numbers)
            return
        pruned = " after pruning older images of the repository" if room.pruned else ""
        raise InsufficientSpace(
            f"not enough disk space to pull {target.tag}: {numbers}{pruned}; the current "
            "container keeps running, retried at the next check",
            tag=target.tag, needed=room.needed, free=room.free, path=path)

    def _where_to_measure(self) -> str | None:
        """Where the agent sees Docker's data root (DOCKER_DATA_ROOT), asked once."""
        if self._data_root is None:
            storage = self.engine.storage()
            self._platform = storage.platform
            root = storage.root_dir
            self._data_root = data_root(
                self.settings.docker_data_root, root, local_daemon=storage.local,
                in_container=in_container(), is_dir=bool(root) and os.path.isdir(root),
                is_mount=bool(root) and os.path.ismount(root))
        if self._data_root.path is None:
            self._cannot_check_room(self._data_root.why)
        return self._data_root.path

    def _layers_of(self, target: Target) -> ImageLayers | None:
        """The layers of the target image, from the registry (once per digest)."""
        assert target.digest is not None
        if self._layers is not None and self._layers[0] == target.digest:
            return self._layers[1]
        try:
            layers = self.registry.image_layers(target.digest, self._platform)
        except RegistryError as exc:
            self._cannot_check_room(f"cannot estimate the download of {target.tag}: {exc}")
            return None
        self._layers = (target.digest, layers)
        return layers

    def _cannot_check_room(self, why: str) -> None:
        if why == self._room_unknown:
            return
        self._room_unknown = why
        off = self.settings.docker_data_root.lower() == OFF
        log.log(logging.INFO if off else logging.WARNING,
                "free space not checked before pulling: %s", why)

    def _reference(self, target: Target) -> str:
        """How the container names its image: by digest when known (exact, and what
        ``docker ps`` shows an operator), else by tag (a local-only image)."""
        if target.digest:
            return f"{self.settings.repository}@{target.digest}"
        return f"{self.settings.repository}:{target.tag}"

    def _tag_points_at(self, target: Target, image: ImageInfo) -> bool:
        return f"{self.settings.repository}:{target.tag}" in image.tags

    def _verify_and_settle(self, new_id: str, old_id: str | None) -> CheckOutcome:
        verdict, reason = self._verify(new_id)
        if verdict is Verdict.WAIT:
            log.info("stopping during verification; it resumes at the next start")
            return CheckOutcome.INTERRUPTED
        if verdict is Verdict.HEALTHY:
            self._failpoint("verified")
            self._commit(new_id, old_id)
            return CheckOutcome.UPDATED
        self._rollback(new_id, old_id, reason)
        return CheckOutcome.ROLLED_BACK

    def _verify(self, container_id: str) -> tuple[Verdict, str]:
        """Watch the new container until it proves itself, fails, or we must stop."""
        self.status.set_update(UpdateStatus.VERIFYING)
        first = self.engine.container(container_id)
        if first is None:
            return Verdict.FAILED, "container disappeared"
        started = time.monotonic()
        while True:
            info = self.engine.container(container_id)
            if info is None:
                return Verdict.FAILED, "container disappeared"
            probe = Probe(info.status, info.health, info.restart_count,
                          time.monotonic() - started)
            verdict, reason = judge(
                probe, has_healthcheck=info.has_healthcheck,
                initial_restarts=first.restart_count,
                timeout_s=self.settings.health_timeout_s,
            )
            if verdict is not Verdict.WAIT:
                log.info("verification of %s: %s (%s)", self.name, verdict, reason)
                return verdict, reason
            if self.should_abort():
                return Verdict.WAIT, "interrupted"
            time.sleep(VERIFY_POLL_S)

    def _commit(self, new_id: str, old_id: str | None) -> None:
        pending = self.state.pending
        assert pending is not None
        old = self.engine.container(old_id) if old_id else None
        if old is not None:
            self.engine.remove(old.id)
            if old.image_id != pending.target.image_id:
                shown = self.view(old)
                self.state.previous = ImageRef(shown.tag or "unknown", shown.digest, old.image_id)
        self.state.applied = pending.target
        self.state.pending = None
        self.state.interrupted = []
        self.data.save_state(self.state)
        self.status.last_success_at = utc_now()
        self.status.latest_version = pending.target.tag
        self.observe()
        self._end_update()
        self.status.event(EventName.UPDATE_SUCCEEDED, tag=pending.target.tag,
                          digest=pending.target.digest, container_id=new_id,
                          request_id=pending.request_id)
        self._prune()

    def _rollback(self, new_id: str | None, old_id: str | None, reason: str) -> None:
        """The new container failed: journal why, put the old one back, remember it."""
        pending = self.state.pending
        assert pending is not None
        log.error("update to %s failed (%s); rolling back", pending.target.tag, reason)
        pending.failure = reason
        pending.step = "rolling_back"
        self.data.save_state(self.state)
        self._failpoint("rolling_back")
        self.status.set_update(UpdateStatus.ROLLING_BACK)
        restored = self._restore(self._find(new_id), self._find(old_id))
        self._settle_failure(reason, restored)

    def _restore(self, new: ContainerInfo | None, old: ContainerInfo | None) -> bool:
        """Remove the new container (and any ``-next``/``-previous`` that is not the old
        one), put the old one back under the container name and running. Idempotent.
        Returns whether there was an old container to restore."""
        if new is not None and (old is None or new.id != old.id):
            self.engine.remove(new.id)
        for name in (self.next_name, self.previous_name):
            stale = self.engine.container(name)
            if stale is not None and (old is None or stale.id != old.id):
                self.engine.remove(stale.id)
        if old is None:
            return False
        if old.name != self.name:
            self.engine.rename(old.id, self.name)
        if not old.running:
            try:
                self.engine.start(old.id)
            except EdgeAgentError as exc:
                if self._find(old.id) is None:  # raises while the daemon is gone: retried
                    raise
                # The old container is back in place but will not start either: as far
                # as a rollback can go. Stopping here keeps recovery from failing forever
                # (a fixed image could never be tried).
                log.error("the previous container %s did not start either: %s", old.id[:12],
                          exc)
                return False
        return True

    def _settle_failure(self, reason: str, restored: bool) -> None:
        """Remember the failed attempt (not tried again under this desired tag and run
        config), end the update and answer the request that asked for it."""
        pending = self.state.pending
        assert pending is not None
        key = pending.target.digest or pending.target.image_id
        desired = pending.desired_tag or pending.target.tag
        self.state.failed.append(attempt(desired, key, pending.config_digest, reason,
                                         pending.target.image_id))
        self.state.interrupted = [r for r in self.state.interrupted if r.get("digest") != key]
        self.state.pending = None
        self.data.save_state(self.state)
        self.status.last_error = f"update to {pending.target.tag} rolled back: {reason}"
        self.observe()
        self._end_update()
        self.status.event(EventName.ROLLED_BACK, tag=pending.target.tag,
                          digest=pending.target.digest, reason=reason, restored=restored,
                          request_id=pending.request_id)

    def _prune(self, keep_also: frozenset[str] = frozenset()) -> int:
        """Keep the current and previous images of the repository (and ``keep_also``);
        remove the others. Returns how many it removed (or tried: one in use stays)."""
        self._prune_due = False
        keep = {ref.image_id for ref in (self.state.applied, self.state.previous) if ref}
        keep |= keep_also
        pruned = 0
        for image in self.engine.repository_images(self.settings.repository):
            if image.id not in keep:
                self.engine.remove_image_refs(image, self.settings.repository)
                pruned += 1
        return pruned

    # -- recovery ---------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo an update that a crash or a Docker error broke off, from the
        journal and the containers found. Idempotent: what it cannot do now (daemon gone)
        it does next time; an update undone here without a verdict is counted, so one
        that never gets a verdict gives up (MAX_INTERRUPTED)."""
        # The check that runs recovery already shows its own desired tag; the update
        # found here is an older one: its events answer its own request only, and the
        # state shows no verdict ("idle") on the new one until the check has one.
        desired, self.status.desired = self.status.desired, None
        self._recovering = True
        try:
            self._recover()
        finally:
            self._recovering = False
            self.status.desired = desired

    def _end_update(self) -> None:
        """The update is over: idle, unless a check goes on after recovering it."""
        if not self._recovering:
            self.status.set_update(UpdateStatus.IDLE)

    def _recover(self) -> None:
        pending = self.state.pending
        current = self.engine.container(self.name)
        previous = self.engine.container(self.previous_name)
        upcoming = self.engine.container(self.next_name)
        if pending is None and previous is None and upcoming is None:
            return
        if pending is not None:
            # The journal names both containers; by name only what it could not record.
            old = self._find(pending.old_container_id) or previous
            new = self._find(pending.new_container_id) or upcoming
        elif upcoming is not None:  # state lost: the names are all there is
            new, old = upcoming, previous or current
        else:
            new, old = current, previous
        found = Found(
            journal=pending is not None,
            step=pending.step if pending else None,
            failure=pending.failure if pending else None,
            new_status=new.status if new else None,
            new_in_place=new is not None and new.name == self.name,
            old_exists=old is not None,
        )
        plan = plan_recovery(found)
        if plan is Recovery.CLEAR:
            self._forget_pending()
            return
        log.warning("found an interrupted update (%s); recovering",
                    ", ".join(c.name for c in (current, previous, upcoming) if c)
                    or f"journalled at {found.step}")
        if plan is Recovery.VERIFY:
            assert new is not None and pending is not None
            if old is not None and old.running:
                self.engine.stop(old.id)
            self._verify_and_settle(new.id, old.id if old else None)
            return
        if pending is not None:
            self.status.set_update(UpdateStatus.ROLLING_BACK)
        restored = self._restore(new, old)
        if pending is None:
            return
        if pending.failure is not None:
            self._settle_failure(pending.failure, restored)
        elif counts_as_interrupted(found, plan):
            self._count_interruption(pending, restored)
        else:
            self._forget_pending()

    def _count_interruption(self, pending: PendingUpdate, restored: bool) -> None:
        key = pending.target.digest or pending.target.image_id
        desired = pending.desired_tag or pending.target.tag
        config = pending.config_digest
        self.state.interrupted.append(
            attempt(desired, key, config, f"broken off at step {pending.step}"))
        count = interruptions(self.state.interrupted, desired, key, config or "")
        if count >= MAX_INTERRUPTED:
            self._settle_failure(f"broken off {count} times without a verdict (the agent or "
                                 "the Docker daemon stopped during the update)", restored)
            return
        log.warning("the update to %s was broken off (%d of %d times); trying it again",
                    pending.target.tag, count, MAX_INTERRUPTED)
        self._forget_pending()

    def _forget_pending(self) -> None:
        if self.state.pending is not None:
            self.state.pending = None
            self.data.save_state(self.state)

    # -- observation --------------------------------------------------------------
    def observe(self) -> ContainerInfo | None:
        """Refresh the running view of the state document from Docker."""
        info = self.engine.container(self.name)
        self.status.running = self.view(info)
        return info

    def view(self, info: ContainerInfo | None) -> RunningView:
        if info is None:
            return RunningView()
        applied = self.state.applied
        matches = applied is not None and applied.image_id == info.image_id
        return RunningView(
            tag=applied.tag if applied and matches else info.tag,
            digest=(applied.digest if applied and matches else None)
            or info.labels.get(LABEL_DIGEST),
            container_id=info.id,
            status=info.status,
            health=info.health,
            started_at=info.started_at,
            restart_count=info.restart_count,
        )

    def _remove_named(self, name: str) -> None:
        stale = self.engine.container(name)
        if stale is not None:
            self.engine.remove(stale.id)

    def _find(self, container_id: str | None) -> ContainerInfo | None:
        return self.engine.container(container_id) if container_id else None

    def _failpoint(self, step: str) -> None:
        if self.step_hook is not None:
            self.step_hook(step)
        if self._kill_at == step:
            log.warning("%s=%s: killing the agent now", KILL_AT_ENV, step)
            os.kill(os.getpid(), signal.SIGKILL)

