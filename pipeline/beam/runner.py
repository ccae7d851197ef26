"""Pipeline construction from Beam options, with an offline-safe DirectRunner.

Beam 2.77's ``DirectRunner`` first tries the Prism runner, which downloads a Prism binary from the network
at run time. Nothing here may download at run time, so for ``--runner=DirectRunner`` (the default) we run
the same in-process portable runner the DirectRunner falls back to (``FnApiRunner``), honouring
``--direct_num_workers`` and ``--direct_running_mode`` (in_memory, multi_threading, multi_processing).
Every other runner (``FlinkRunner``, ``SparkRunner``, ``DataflowRunner``, ``PrismRunner``...) is used as
Beam resolves it from the options, untouched.
"""
from __future__ import annotations

from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

_DIRECT_NAMES = {None, "DirectRunner", "directrunner", "SwitchingDirectRunner"}


def make_pipeline(beam_args: Optional[List[str]] = None) -> beam.Pipeline:
    options = PipelineOptions(list(beam_args or []))
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in _DIRECT_NAMES:
        return beam.Pipeline(runner=_local_runner(options), options=options)
    return beam.Pipeline(options=options)


def _local_runner(options: PipelineOptions):
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)
