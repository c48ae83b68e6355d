"""One interface for generation engines (vLLM; HF transformers) + request validation shared by both."""
from __future__ import annotations

import io
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from coreseg.common.config import RolloutConfig, TrainConfig
from coreseg.common.protocol import RolloutGroup, RolloutRequest, WeightBundle

logger = logging.getLogger("coreseg.rollout")
# Leads the error of a request whose prompt cannot fit rollout.max_model_len (counted as rollout/prompt_too_long)
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, greedy: bool = False, seed: Optional[int] = None) -> "Sampling":
        r = cfg.rollout
        return cls(temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p,
                   max_new_tokens=r.max_new_tokens, seed=seed)


def as_sampling(sampling: Union[Sampling, RolloutConfig, None], cfg: TrainConfig) -> Sampling:
    """Engines take a Sampling, a RolloutConfig (its temperature/top_p/max_new_tokens/seed) or None (the config's)."""
    if isinstance(sampling, Sampling):
        return sampling
    r = sampling if isinstance(sampling, RolloutConfig) else cfg.rollout
    return Sampling(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=r.seed)


def request_image(request: RolloutRequest) -> Tuple[Optional[Image.Image], Optional[str]]:
    """The request's image as PIL RGB, or an error message (bad bytes, wrong shape/dtype)."""
    image = request.image
    try:
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as img:
                return img.convert("RGB"), None
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 8:
            return None, f"image must be HxWx3 uint8 (>= 8 px), got shape {arr.shape} dtype {arr.dtype}"
        return Image.fromarray(arr), None
    except Exception as err:  # PIL raises several types on corrupt bytes
        return None, f"image cannot be decoded ({type(err).__name__}: {err})"


class GenerationEngine(ABC):
    """generate(requests, n, sampling) -> one RolloutGroup per request with exactly n completions (or an error)."""

    version: int = 0

    def __init__(self, cfg: TrainConfig, policy_dir: str):
        from coreseg.common.models.policy import load_processor, policy_info

        self.cfg = cfg
        self.policy_dir = str(policy_dir)
        self.processor = load_processor(self.policy_dir, cfg.model.min_pixels, cfg.model.max_pixels)
        self.info = policy_info(self.policy_dir)
        self.family = self.info.family
        self.errors = 0

    def prepare(self, requests: Sequence[RolloutRequest], max_new_tokens: int):
        """Per request: (PIL image, prompt ids) or an error string; too-long prompts are errors."""
        prepared: List[object] = []
        for req in requests:
            image, err = request_image(req)
            if err is None:
                ids = self.processor(text=[req.prompt], images=[image], return_tensors="np")["input_ids"][0]
                err = self._length_error(req.sample_id, ids, image, max_new_tokens)
            if err is not None:
                logger.warning("rollout request for sample %r refused: %s", req.sample_id, err)
                self.errors += 1
                prepared.append(err)
            else:
                prepared.append((image, [int(i) for i in ids]))
        return prepared

    def _length_error(self, sample_id: str, ids, image, max_new_tokens: int) -> Optional[str]:
        """An error naming the sample when its prompt leaves no room for max_new_tokens in max_model_len."""
        limit = self.cfg.rollout.max_model_len - max_new_tokens
        if len(ids) <= limit:
            return None
        vision = int((ids == self.info.image_token_id).sum())
        return (f"{PROMPT_TOO_LONG}: sample {sample_id!r}: prompt is {len(ids)} tokens ({vision} vision tokens for a "
                f"{image.width}x{image.height} image) but rollout.max_model_len - max_new_tokens = {limit}; lower "
                f"model.max_pixels (now {self.cfg.model.max_pixels or 'the processor default'}) or raise "
                f"rollout.max_model_len")

    @abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], n: int,
                 sampling: Union[Sampling, RolloutConfig, None] = None) -> List[RolloutGroup]:
        raise NotImplementedError

    @abstractmethod
    def load_weights(self, bundle: WeightBundle) -> int:
        """Serve the bundle's LoRA from now on; returns the version served."""
        raise NotImplementedError

    def loaded_adapters(self) -> List[int]:
        """Ids of the LoRA adapters resident in the engine (at most two)."""
        return []

    @abstractmethod
    def sleep(self) -> None:
        """Free the engine's GPU memory for a colocated learner (cluster.colocate)."""
        raise NotImplementedError

    @abstractmethod
    def wake_up(self) -> None:
        """Take the GPU memory back, serving the same LoRA version as before `sleep`."""
        raise NotImplementedError


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:  # an unusable install counts as absent
        return False


def make_engine(cfg: TrainConfig, policy_dir, device: str = "cpu", ray_bundles: Sequence[int] = (),
                rank_gpus: float = 0.0) -> GenerationEngine:
    """device: the rollout role's configured device. ray_bundles / rank_gpus: the placement-group bundles of a
    tensor-parallel vLLM engine's ranks and the GPU share each rank asks (rollout.tensor_parallel_size > 1)."""
    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        from coreseg.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(cfg, policy_dir, device, ray_bundles, rank_gpus)
    from coreseg.rollout.hf_engine import HFEngine
    return HFEngine(cfg, policy_dir, device)
