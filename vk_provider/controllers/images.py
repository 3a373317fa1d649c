"""The image service: turns a Pod's container images into pull plans and runs them on the puller.

Resolution order for an image: the catalog (shipped ``config/images.yaml`` plus the user's files),
then, by setting (``images.unknown_images``): a deterministic synthetic manifest; a failure
(``ErrImagePull`` with the kubelet's back-off); or the image's real manifest from its OCI registry
(``registry``). Registry manifests are resolved in parallel for a Pod, with the Pod's
``imagePullSecrets``, kept in memory and stored in the registry database, so a later start reuses
them without contacting the registry; a registry failure is ``ErrImagePull`` and is retried on each
of the Pod's pull attempts. The plan for a Pod is made once, when its images are first needed, from
the images its cache decision makes present; the pod worker then pulls container by container.

Must not: speak HTTP or read Secrets itself (the ``ManifestResolver`` and ``CredentialSource`` seams
do), or decide what a pull costs (``domain.pullmodel``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Literal, Protocol

from vk_provider.controllers.pods import CacheDecision, ImagePullError, ImageResult
from vk_provider.controllers.puller import Puller, PullFailed
from vk_provider.domain.catalog import Catalog, synthetic_manifest
from vk_provider.domain.images import ImageRef, InvalidReference, parse_reference
from vk_provider.domain.model import ImageManifest
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.pullmodel import (
    ErrImageNeverPull,
    ImagePullStep,
    PodPullPlan,
    PullPolicy,
    StepAction,
    plan_pod_pull,
)
from vk_provider.oci.client import RegistryError
from vk_provider.oci.credentials import Credentials, lookup

log = logging.getLogger(__name__)

UnknownImages = Literal["synthetic", "fail", "registry"]
REGISTRY_SOURCE = "registry"


class ManifestResolver(Protocol):
    """Reads an image's manifest from its registry (``oci.RegistryClient``)."""

    async def resolve(self, ref: ImageRef, credentials: Credentials | None = None) -> ImageManifest | RegistryError:
        """The manifest for the node's platform, or why not; never raises but for cancellation."""
        ...

    async def close(self) -> None: ...


class ManifestStore(Protocol):
    """Where resolved manifests are remembered across restarts (``registry.Registry``)."""

    async def save_manifest(self, manifest: ImageManifest, *, replace: bool = True) -> None:
        """``replace=False``: leave a manifest already stored under that reference as it is."""
        ...

    async def get_manifest(self, reference: str) -> ImageManifest | None: ...


class CredentialSource(Protocol):
    """A Pod's ``imagePullSecrets`` as credentials by registry host (``kube.secrets.PullSecrets``)."""

    async def credentials(self, namespace: str, names: Sequence[str]) -> Mapping[str, Credentials]:
        """Never raises: an unusable Secret is logged and left out."""
        ...


class CatalogImages:
    """Implements the pod controller's ``ImageService`` and the cache controller's ``ManifestSource``."""

    def __init__(
        self,
        catalog: Catalog,
        puller: Puller,
        *,
        unknown: UnknownImages = "synthetic",
        seed: int = 0,
        on_manifest: Callable[[ImageManifest], None] | None = None,
        resolver: ManifestResolver | None = None,
        store: ManifestStore | None = None,
        credentials: CredentialSource | None = None,
    ) -> None:
        if unknown == "registry" and resolver is None:
            raise ValueError("unknown images from the registry need a ManifestResolver")
        self.catalog = catalog
        self.puller = puller
        self.unknown = unknown
        self.seed = seed
        self._on_manifest = on_manifest
        self._resolver = resolver
        self._store = store
        self._credentials = credentials
        # Registry manifests by normalised reference: each is read from the registry (or the store)
        # once per agent run.
        self._resolved: dict[str, ImageManifest] = {}
        # Registry manifests read with credentials, and which: reused only for Pods with the same.
        self._private: dict[str, Credentials] = {}
        # One registry request per image and credentials, however many Pods want it at once.
        self._inflight: dict[tuple[str, Credentials | None], asyncio.Task[ImageManifest | ImagePullError]] = {}
        # Catalog and synthetic manifests used, stored once each by :meth:`run`, so the database
        # shows every image the node used (its layers too), not only those read from a registry.
        self._to_store: asyncio.Queue[ImageManifest] = asyncio.Queue()
        self._noted: set[str] = set()

    def manifest(self, image: str) -> ImageManifest | InvalidReference | None:
        """The manifest for an image reference, without waiting.

        ``None`` when unknown and unknown images fail, or come from a registry and this one has not
        been resolved yet (:meth:`resolve` waits for it).
        """
        found = self._local(image)
        if found is None and self.unknown == "registry":
            ref = parse_reference(image)
            assert isinstance(ref, ImageRef)  # _local returned the InvalidReference otherwise
            return self._resolved.get(ref.normalized)
        return found

    def _local(self, image: str) -> ImageManifest | InvalidReference | None:
        """The catalog's manifest, else (by setting) a synthetic one: never a registry's."""
        ref = parse_reference(image)
        if isinstance(ref, InvalidReference):
            return ref
        found = self.catalog.get(ref.normalized)
        if found is None and self.unknown == "synthetic":
            found = synthetic_manifest(ref.normalized, self.seed)
        if found is not None:
            if self._on_manifest is not None:
                self._on_manifest(found)
            if self._store is not None and found.reference not in self._noted:
                self._noted.add(found.reference)
                self._to_store.put_nowait(found)
        return found

    async def run(self) -> None:
        """Store the catalog and synthetic manifests used (once each, one at a time), never in
        place of one already stored: a registry's manifest stays. A failure is logged; the next
        agent run stores the manifest again."""
        while True:
            manifest = await self._to_store.get()
            if self._store is None:
                continue
            try:
                await self._store.save_manifest(manifest, replace=False)
            except Exception as exc:
                log.warning("image %s: cannot store its manifest (%s); it is kept in memory", manifest.reference, exc)

    async def resolve(
        self, image: str, *, namespace: str = "", pull_secrets: Sequence[str] = ()
    ) -> ImageManifest | InvalidReference | ImagePullError:
        """The manifest for an image, reading it from its registry (with these Secrets) if the setting says so."""
        found = self._local(image)
        if found is not None:
            return found
        ref = parse_reference(image)
        assert isinstance(ref, ImageRef)  # _local returned the InvalidReference otherwise
        if self.unknown != "registry":
            return _not_in_catalog(image)
        results = await self._from_registry([ref], namespace, pull_secrets)
        return results[ref.normalized]

    async def for_pod(self, pod: PodFacts, decision: CacheDecision) -> PlannedPodImages:
        found: dict[str, ImageManifest | InvalidReference | ImagePullError | None] = {
            spec.name: self._local(spec.image) for spec in pod.containers
        }
        # Images left to read from their registry, all at once, by container name.
        remote: dict[str, ImageRef] = {}
        if self.unknown == "registry":
            for spec in pod.containers:
                ref = parse_reference(spec.image)
                never = _policy(spec.pull_policy) is PullPolicy.NEVER  # the registry is never asked
                if found[spec.name] is None and isinstance(ref, ImageRef) and not never:
                    remote[spec.name] = ref
        if remote:
            unique = list({ref.normalized: ref for ref in remote.values()}.values())
            fetched = await self._from_registry(unique, pod.namespace, pod.pull_secrets)
            found.update({name: fetched[ref.normalized] for name, ref in remote.items()})
        problems: dict[str, ImagePullError] = {}
        planned: list[tuple[ContainerSpec, ImageManifest]] = []
        retryable: set[str] = set()
        for spec in pod.containers:
            manifest = found[spec.name]
            if manifest is None and _policy(spec.pull_policy) is PullPolicy.NEVER:
                # Not on the instance and never pulled: the kubelet's ErrImageNeverPull, whatever
                # unknown images do (they would only come from a pull).
                problems[spec.name] = ImagePullError(
                    "ErrImageNeverPull", ErrImageNeverPull(spec.image).message, retry=False
                )
            elif isinstance(manifest, InvalidReference):
                problems[spec.name] = ImagePullError(
                    "InvalidImageName",
                    f'Failed to apply default image tag "{spec.image[:200]}": couldn\'t parse image reference: '
                    f"{manifest.reason}",
                    retry=False,
                )
            elif isinstance(manifest, ImagePullError):
                problems[spec.name] = manifest
                retryable.add(spec.name)
            elif manifest is None:
                problems[spec.name] = _not_in_catalog(spec.image)
            else:
                planned.append((spec, manifest))
        plan = plan_pod_pull(
            [(manifest, _policy(spec.pull_policy)) for spec, manifest in planned],
            present_layers=(),
            cached_images=decision.present_images,
        )
        steps = {spec.name: step for (spec, _), step in zip(planned, plan.steps, strict=True)}

        async def again(spec: ContainerSpec) -> ImageManifest | ImagePullError:
            result = await self.resolve(spec.image, namespace=pod.namespace, pull_secrets=pod.pull_secrets)
            return result if not isinstance(result, InvalidReference) else _not_in_catalog(spec.image)

        return PlannedPodImages(
            self.puller,
            plan,
            steps,
            problems,
            retry=again if retryable else None,
            retryable=retryable,
            cached_images=decision.present_images,
        )

    async def close(self) -> None:
        """Cancel registry reads in flight and close the resolver (it was handed to this service)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._resolver is not None:
            await self._resolver.close()

    # -- the registry

    async def _from_registry(
        self, refs: Sequence[ImageRef], namespace: str, pull_secrets: Sequence[str]
    ) -> dict[str, ImageManifest | ImagePullError]:
        out: dict[str, ImageManifest | ImagePullError] = {}
        credentials: Mapping[str, Credentials] | None = None

        async def pods_credentials() -> Mapping[str, Credentials]:
            nonlocal credentials
            if credentials is None:
                credentials = {}
                if pull_secrets and self._credentials is not None:
                    credentials = await self._credentials.credentials(namespace, pull_secrets)
            return credentials

        missing: list[ImageRef] = []
        for ref in refs:
            known = self._resolved.get(ref.normalized)
            private = self._private.get(ref.normalized)
            if known is None:
                missing.append(ref)
            elif private is not None and lookup(ref.registry, await pods_credentials()) != private:
                # Every ECI Pod pulls on its own instance: an image read with another Pod's
                # credentials is not this Pod's to use until the registry lets it read it.
                missing.append(ref)
            else:
                out[ref.normalized] = known
        if not missing:
            return out
        stored = await asyncio.gather(*(self._stored(ref) for ref in missing))
        remote: list[ImageRef] = []
        for ref, manifest in zip(missing, stored, strict=True):
            if manifest is None or ref.normalized in self._private:
                remote.append(ref)
            else:
                out[ref.normalized] = self._remember(manifest)
        if not remote:
            return out
        table = await pods_credentials()
        results = await asyncio.gather(*(self._shared_fetch(ref, lookup(ref.registry, table)) for ref in remote))
        for ref, result in zip(remote, results, strict=True):
            out[ref.normalized] = result
        return out

    async def _stored(self, ref: ImageRef) -> ImageManifest | None:
        if self._store is None:
            return None
        try:
            found = await self._store.get_manifest(ref.normalized)
        except Exception as exc:
            log.warning("image %s: cannot read its stored manifest (%s); asking the registry", ref.normalized, exc)
            return None
        # A synthetic or catalog manifest stored under this reference (by an offline simulation,
        # say) is not what the registry holds.
        return found if found is not None and found.source == REGISTRY_SOURCE else None

    def _remember(self, manifest: ImageManifest) -> ImageManifest:
        self._resolved[manifest.reference] = manifest
        if self._on_manifest is not None:
            self._on_manifest(manifest)
        return manifest

    async def _shared_fetch(self, ref: ImageRef, credentials: Credentials | None) -> ImageManifest | ImagePullError:
        if ref.normalized in self._resolved and self._private.get(ref.normalized) in (None, credentials):
            return self._resolved[ref.normalized]  # read for another Pod while this one looked in the store
        key = (ref.normalized, credentials)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(ref, credentials), name=f"resolve-image:{ref.normalized}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: one Pod giving up (deleted) must not cancel the read other Pods wait for.
        return await asyncio.shield(task)

    def _forget(self, key: tuple[str, Credentials | None], task: asyncio.Task[ImageManifest | ImagePullError]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _fetch(self, ref: ImageRef, credentials: Credentials | None) -> ImageManifest | ImagePullError:
        assert self._resolver is not None
        result = await self._resolver.resolve(ref, credentials)
        if isinstance(result, RegistryError):
            log.info("image %s: %s", ref.normalized, result.message)
            return ImagePullError("ErrImagePull", f'failed to resolve reference "{ref.normalized}": {result.message}')
        manifest = self._remember(result)
        if credentials is None:
            self._private.pop(ref.normalized, None)
        else:
            self._private[ref.normalized] = credentials
        if self._store is not None:
            try:
                await self._store.save_manifest(manifest)
            except Exception as exc:
                log.warning("image %s: cannot store its manifest (%s); it is kept in memory", ref.normalized, exc)
        log.info(
            "image %s: %d layers, %d bytes (digest %s) from its registry",
            ref.normalized,
            len(manifest.layers),
            manifest.size,
            manifest.digest,
        )
        return manifest


def _not_in_catalog(image: str) -> ImagePullError:
    return ImagePullError(
        "ErrImagePull",
        f"image {image[:200]} is not in the image catalog (images.unknown_images: fail); add it to a catalog file",
    )


def _policy(text: str) -> PullPolicy:
    try:
        return PullPolicy(text)
    except ValueError:
        return PullPolicy.IF_NOT_PRESENT


class PlannedPodImages:
    """Implements ``PodImages`` for one Pod: each container's step of the Pod's plan, on demand.

    A container whose image could not be read from its registry (``retryable``) gets its image
    resolved again on each later pull attempt; once it resolves, its step is planned on top of
    what the Pod has made present so far. So is a container's step when it pulls before an earlier
    container (whose pull failed and is waiting out its back-off).
    """

    def __init__(
        self,
        puller: Puller,
        plan: PodPullPlan,
        steps: dict[str, ImagePullStep],
        problems: dict[str, ImagePullError],
        *,
        retry: Callable[[ContainerSpec], Awaitable[ImageManifest | ImagePullError]] | None = None,
        retryable: Collection[str] = (),
        cached_images: Collection[str] = (),
    ) -> None:
        self._puller = puller
        self._plan = plan
        self._steps = steps
        self._problems = problems
        self._retry = retry
        self._retryable = set(retryable)
        self._cached_images = frozenset(cached_images)
        self._attempted: set[str] = set()
        self._present_layers = {layer.digest for layer in plan.snapshot_layers}
        self._group = puller.new_group("pod")
        self._done: set[str] = set()

    @property
    def plan(self) -> PodPullPlan:
        return self._plan

    async def attach_snapshot(self) -> float:
        return await self._puller.attach_snapshot(self._plan) if self._plan.attach_snapshot else 0.0

    def _step(self, name: str) -> ImagePullStep:
        """The container's step, as planned when the containers before it have pulled and none
        after it has (the kubelet's order); else planned again on what is present now (a pull
        failed and the next container went first)."""
        step = self._steps[name]
        before = True
        for other, planned in self._steps.items():
            if other == name:
                before = False
            elif (planned.reference in self._done) is not before:
                return plan_pod_pull(
                    [(step.manifest, step.policy)],
                    present_layers=self._present_layers,
                    cached_images=self._cached_images,
                ).steps[0]
        return step

    def will_pull(self, container: ContainerSpec) -> bool:
        problem = self._problems.get(container.name)
        if problem is not None:
            return problem.reason == "ErrImagePull"
        step = self._step(container.name)
        if step.reference in self._done:
            return step.policy is PullPolicy.ALWAYS
        return step.action is StepAction.PULL

    def ran_before(self, container: ContainerSpec) -> None:
        step = self._steps.get(container.name)
        if step is not None and container.name not in self._problems:
            self._done.add(step.reference)
            self._present_layers.update(layer.digest for layer in step.manifest.layers)

    async def pull(self, container: ContainerSpec) -> ImageResult:
        problem = self._problems.get(container.name)
        if problem is not None:
            await self._resolve_again(container, problem)
        step = self._step(container.name)
        image_id = _image_id(step.manifest)
        size = step.manifest.size
        if step.reference in self._done and step.action is not StepAction.NEVER_PULL:
            # A restarted container: its image is on the instance now.
            if step.policy is PullPolicy.ALWAYS:
                seconds = await self._puller.manifest_round_trip()
                return ImageResult(image_id, size, seconds=seconds)
            return ImageResult(image_id, size, present=True)
        outcome = await self._puller.pull_step(step, self._group)
        if isinstance(outcome, PullFailed):
            if outcome.reason == "ErrImageNeverPull":  # named as the Pod spells it, as the kubelet does
                message = ErrImageNeverPull(container.image).message
                raise ImagePullError(outcome.reason, message, retry=False)
            raise ImagePullError(outcome.reason, outcome.message)
        self._done.add(step.reference)
        self._present_layers.update(layer.digest for layer in step.manifest.layers)
        return ImageResult(
            image_id=image_id,
            size=size,
            seconds=outcome.seconds,
            downloaded=outcome.bytes_downloaded,
            present=outcome.already_present,
            from_cache=outcome.from_cache and outcome.already_present,
        )

    async def _resolve_again(self, container: ContainerSpec, problem: ImagePullError) -> None:
        """Raise the container's problem, unless a registry read that failed before now works.

        The first attempt reports the failure found while planning; later ones (after the pod
        worker's back-off) ask the registry again.
        """
        name = container.name
        first = name not in self._attempted
        self._attempted.add(name)
        if self._retry is None or name not in self._retryable or first:
            raise problem
        found = await self._retry(container)
        if isinstance(found, ImagePullError):
            self._problems[name] = found
            raise found
        step = plan_pod_pull(
            [(found, _policy(container.pull_policy))],
            present_layers=self._present_layers,
            cached_images=self._cached_images,
        ).steps[0]
        self._steps[name] = step
        del self._problems[name]
        self._retryable.discard(name)


def _image_id(manifest: ImageManifest) -> str:
    repository = manifest.reference.split("@", 1)[0]
    tail = repository.rsplit("/", 1)[-1]
    if ":" in tail:
        repository = repository[: len(repository) - len(tail)] + tail.split(":", 1)[0]
    return f"{repository}@{manifest.digest}"
