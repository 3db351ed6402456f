"""AI-in-the-loop orchestrator for HPC.

One long-running coordinator couples C MPI simulations with a PyTorch surrogate
trained on Dask workers, inside one Slurm allocation or on a laptop, and tracks
every round in MLflow. Start with ``python -m orchestrator run loop.yml``.
"""

__version__ = "0.1.0"
