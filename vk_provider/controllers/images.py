"""The image service: turns a Pod's container images into pull plans and runs them on the puller.

Resolution order for an image: the catalog (shipped ``config/images.yaml`` plus the user's files),
then — by setting — a deterministic synthetic manifest, or a failure (``ErrImagePull`` with the
kubelet's back-off). The plan for a Pod is made once, when its images are first needed, from the
images its cache decision makes present; the pod worker then pulls container by container.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from vk_provider.controllers.pods import CacheDecision, ImagePullError, ImageResult
from vk_provider.controllers.puller import Puller, PullFailed
from vk_provider.domain.catalog import Catalog, synthetic_manifest
from vk_provider.domain.images import InvalidReference, parse_reference
from vk_provider.domain.model import ImageManifest
from vk_provider.domain.podspec import ContainerSpec, PodFacts
from vk_provider.domain.pullmodel import ImagePullStep, PodPullPlan, PullPolicy, StepAction, plan_pod_pull

UnknownImages = Literal["synthetic", "fail"]


class CatalogImages:
    """Implements the pod controller's ``ImageService``."""

    def __init__(
        self,
        catalog: Catalog,
        puller: Puller,
        *,
        unknown: UnknownImages = "synthetic",
        seed: int = 0,
        on_manifest: Callable[[ImageManifest], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.puller = puller
        self.unknown = unknown
        self.seed = seed
        self._on_manifest = on_manifest

    def manifest(self, image: str) -> ImageManifest | InvalidReference | None:
        """The manifest for an image reference; ``None`` if unknown and unknown images fail."""
        ref = parse_reference(image)
        if isinstance(ref, InvalidReference):
            return ref
        found = self.catalog.get(ref.normalized)
        if found is None and self.unknown == "synthetic":
            found = synthetic_manifest(ref.normalized, self.seed)
        if found is not None and self._on_manifest is not None:
            self._on_manifest(found)
        return found

    async def for_pod(self, pod: PodFacts, decision: CacheDecision) -> PlannedPodImages:
        problems: dict[str, ImagePullError] = {}
        planned: list[tuple[ContainerSpec, ImageManifest]] = []
        for spec in pod.containers:
            found = self.manifest(spec.image)
            if isinstance(found, InvalidReference):
                problems[spec.name] = ImagePullError(
                    "InvalidImageName",
                    f'Failed to apply default image tag "{spec.image[:200]}": couldn\'t parse image reference: '
                    f"{found.reason}",
                    retry=False,
                )
            elif found is None:
                problems[spec.name] = ImagePullError(
                    "ErrImagePull",
                    f"image {spec.image[:200]} is not in the image catalog (images.unknown_images: fail); "
                    "add it to a catalog file",
                )
            else:
                planned.append((spec, found))
        plan = plan_pod_pull(
            [(manifest, _policy(spec.pull_policy)) for spec, manifest in planned],
            present_layers=(),
            cached_images=decision.present_images,
        )
        steps = {spec.name: step for (spec, _), step in zip(planned, plan.steps, strict=True)}
        return PlannedPodImages(self.puller, plan, steps, problems)


def _policy(text: str) -> PullPolicy:
    try:
        return PullPolicy(text)
    except ValueError:
        return PullPolicy.IF_NOT_PRESENT


class PlannedPodImages:
    """Implements ``PodImages`` for one Pod: each container's step of the Pod's plan, on demand."""

    def __init__(
        self, puller: Puller, plan: PodPullPlan, steps: dict[str, ImagePullStep], problems: dict[str, ImagePullError]
    ) -> None:
        self._puller = puller
        self._plan = plan
        self._steps = steps
        self._problems = problems
        self._group = puller.new_group("pod")
        self._done: set[str] = set()

    @property
    def plan(self) -> PodPullPlan:
        return self._plan

    async def attach_snapshot(self) -> float:
        return await self._puller.attach_snapshot(self._plan) if self._plan.attach_snapshot else 0.0

    def will_pull(self, container: ContainerSpec) -> bool:
        problem = self._problems.get(container.name)
        if problem is not None:
            return problem.reason == "ErrImagePull"
        step = self._steps[container.name]
        if step.reference in self._done:
            return step.policy is PullPolicy.ALWAYS
        return step.action is StepAction.PULL

    async def pull(self, container: ContainerSpec) -> ImageResult:
        problem = self._problems.get(container.name)
        if problem is not None:
            raise problem
        step = self._steps[container.name]
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
            raise ImagePullError(outcome.reason, outcome.message, retry=outcome.reason != "ErrImageNeverPull")
        self._done.add(step.reference)
        return ImageResult(
            image_id=image_id,
            size=size,
            seconds=outcome.seconds,
            downloaded=outcome.bytes_downloaded,
            present=outcome.already_present,
            from_cache=outcome.from_cache and outcome.already_present,
        )


def _image_id(manifest: ImageManifest) -> str:
    repository = manifest.reference.split("@", 1)[0]
    tail = repository.rsplit("/", 1)[-1]
    if ":" in tail:
        repository = repository[: len(repository) - len(tail)] + tail.split(":", 1)[0]
    return f"{repository}@{manifest.digest}"
