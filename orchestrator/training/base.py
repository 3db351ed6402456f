"""What every Dask backend provides (local, allocation, jobqueue); imported by all of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client


class Backend(ABC):
    """Owns a Dask cluster for the campaign's lifetime."""

    client: Client | None = None

    @abstractmethod
    async def start(self) -> Client:
        """Start the cluster and return an asynchronous client with workers ready."""

    @abstractmethod
    async def close(self) -> None:
        """Stop every worker and the scheduler this backend started."""

    def describe(self) -> dict[str, Any]:
        """Facts for events.jsonl and the summary."""
        if self.client is None:
            return {}
        info = self.client.scheduler_info()
        return {"scheduler": info.get("address"), "workers": sorted(info.get("workers", {}))}
