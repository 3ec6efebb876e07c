"""The service's settings: batching, limits and generation-option bounds, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from vlv_engine.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = 16
    max_delay_ms: float = 10.0  # how long the first queued image waits for company
    max_queue: int = 256  # images waiting for the model; beyond it requests get 503
    max_body_mb: float = 32.0
    max_images: int = 16  # per request
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # per image, checked from the header
    timeout_s: float = 30.0  # a whole request, body to response; then 504
    max_num_beams: int = 8
    max_new_tokens_limit: int = 512
    model_name: str = "default"
    # torch intra-op threads of the model (None: leave torch's setting). On a CPU the event
    # loop and image decoding need a core too, and an OpenMP team with a descheduled
    # thread stalls every op: a busy 2-core machine ran the nano model 10-30x slower with
    # 2 threads than with 1.
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            problems.append(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_images < 1:
            problems.append(f"max_images must be >= 1, got {self.max_images}")
        if self.max_queue < self.max_images:
            # A request of max_images images could otherwise never be queued.
            problems.append(f"max_queue ({self.max_queue}) must be >= max_images ({self.max_images})")
        if self.max_body_mb <= 0:
            problems.append(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if self.max_pixels is not None and self.max_pixels <= 0:
            problems.append(f"max_pixels must be > 0 or None, got {self.max_pixels}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            problems.append(f"torch_threads must be >= 1 or None, got {self.torch_threads}")
        if self.max_num_beams < 1 or self.max_new_tokens_limit < 1:
            problems.append("max_num_beams and max_new_tokens_limit must be >= 1")
        if problems:
            raise ValueError("invalid service settings: " + "; ".join(problems))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0
