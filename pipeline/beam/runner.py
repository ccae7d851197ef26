"""Pipeline construction from Beam options, with an offline-safe DirectRunner, and a local Beam job service.

Beam 2.77's ``DirectRunner`` first tries the Prism runner, which downloads a Prism binary from the network
at run time. Nothing here may download at run time, so for ``--runner=DirectRunner`` (the default) we run
the same in-process portable runner the DirectRunner falls back to (``FnApiRunner``), honouring
``--direct_num_workers`` and ``--direct_running_mode`` (in_memory, multi_threading, multi_processing).
Every other runner (``PortableRunner``, ``FlinkRunner``, ``SparkRunner``, ``DataflowRunner``, ``PrismRunner``...)
is used as Beam resolves it from the options, untouched.

``python -m pipeline.beam.runner --port P`` serves Beam's Python job service (``LocalJobServicer``, what
``python -m apache_beam.runners.portability.local_job_service_main`` serves) for ``--runner=PortableRunner
--job_endpoint=localhost:P``, with one change: a job's ``--direct_num_workers`` (default 1) is the number of
SDK harnesses it starts per environment (Beam's own service always starts one). With
``--environment_type=EXTERNAL --environment_config=localhost:Q`` and a worker pool on Q
(``python -m apache_beam.runners.worker.worker_pool_main --service_port Q``), each harness is its own
process: the Runner API submission and SDK harnesses that Flink, Spark and Dataflow workers run.
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


def _parallel_job_type():
    """Beam's ``BeamJob`` whose runner starts ``--direct_num_workers`` SDK harnesses (0: one per CPU)."""
    import os

    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class ParallelBeamJob(local_job_service.BeamJob):
        def _invoke_runner(self):  # BeamJob._invoke_runner with the worker count set
            self.set_state(beam_job_api_pb2.JobState.RUNNING)
            options = self.pipeline_options()
            workers = options.view_as(DirectOptions).direct_num_workers  # a str or float once through the job API
            workers = int(float(workers)) if workers not in (None, "") else 1
            runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
            runner._num_workers = (os.cpu_count() or 1) if workers == 0 else max(1, workers)  # noqa: SLF001
            return runner.run_via_runner_api(self._pipeline_proto, options)

    return ParallelBeamJob


def serve_job_service(port: int = 0, staging_dir: Optional[str] = None) -> None:
    """Serves the job service on ``port`` (0: any free port) until killed; prints ``job service port N``."""
    import sys
    import time

    from apache_beam.runners.portability import local_job_service

    servicer = local_job_service.LocalJobServicer(staging_dir, beam_job_type=_parallel_job_type())
    bound = servicer.start_grpc_server(port)
    print(f"job service port {bound}", flush=True)
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    finally:
        servicer.stop()


if __name__ == "__main__":
    import argparse
    import logging
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.beam.runner",
                                     description="Beam's local job service, honouring --direct_num_workers")
    parser.add_argument("--port", type=int, default=0, help="job API port (0: any free port, printed)")
    parser.add_argument("--staging-dir", default=None, help="artifact staging directory (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve_job_service(args.port, args.staging_dir)
