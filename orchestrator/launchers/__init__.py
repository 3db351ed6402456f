"""Launchers: turning (sim, args, slots) into a running MPI job and its result."""

from orchestrator.launchers.base import Launcher, LaunchRequest, Outcome, SimResult

__all__ = ["LaunchRequest", "Launcher", "Outcome", "SimResult"]
