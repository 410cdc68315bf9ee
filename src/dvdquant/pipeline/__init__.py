"""Generation with a (quantized) video transformer: sampler with step hooks, video files."""

from .generate import GenerationResult, generate, initial_noise
from .video_io import frame_grid_png, save_video

__all__ = ["GenerationResult", "generate", "initial_noise", "frame_grid_png", "save_video"]
