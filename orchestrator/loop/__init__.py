"""The campaign's loop and its rooms, in one package (nothing is imported here: each module is imported by name).

- :mod:`~orchestrator.loop.campaign`: the event loop (asks the policy, starts work, applies results);
- :mod:`~orchestrator.loop.simrunner`: a sim's attempts, retries and back-off;
- :mod:`~orchestrator.loop.services`: Dask and MLflow start-up beside the first sims;
- :mod:`~orchestrator.loop.tracksink`: the MLflow run, off the event loop;
- :mod:`~orchestrator.loop.pictures`: each round's figure and the TensorBoard file;
- :mod:`~orchestrator.loop.twin` and :mod:`~orchestrator.loop.continual`: continual mode (driver and pure rules);
- :mod:`~orchestrator.loop.walltime`: the allocation's end and which sims still fit;
- :mod:`~orchestrator.loop.diskfull`: a full disk told from other failures.

:func:`orchestrator.runner.build_campaign` wires a campaign; nothing else builds one.
"""
