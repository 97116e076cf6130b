"""shoal: reinforcement learning on complex game environments, as simple as Atari."""

from shoal.emulation import Binding, Buffers, EmulatedEnv
from shoal.errors import APIUsageError, EnvError, ShoalError, SpaceError, TrainingError, WorkerError

__all__ = ["Binding", "Buffers", "EmulatedEnv", "ShoalError", "SpaceError", "APIUsageError", "EnvError", "WorkerError",
           "TrainingError"]
__version__ = "0.1.0"
