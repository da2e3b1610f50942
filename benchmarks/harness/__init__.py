"""The one benchmark harness: jobs and ranks (``launch``), timing through the training loop's
``around_cycle`` hook and ``LayerParallel.times`` (``timing``), typed result records and their
JSON (``records``), timed training runs (``training``) and outputs (``render``)."""
from .launch import Job, JobResult, Launcher
from .options import add_kernel_option
from .records import DataFolder, Machine, command_line, from_json, read_json, to_json, write_json
from .render import fmt, pct, pyplot, save, table, write_outputs, write_report
from .timing import CycleTimer, median
from .training import Curve, Stage, TrainRun, timed_train

__all__ = ["Curve", "CycleTimer", "DataFolder", "Job", "JobResult", "Launcher", "Machine", "Stage", "TrainRun",
           "add_kernel_option", "command_line", "fmt", "from_json", "median", "pct", "pyplot", "read_json", "save",
           "table", "timed_train", "to_json", "write_json", "write_outputs", "write_report"]
