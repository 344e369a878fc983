"""nbgrader's configuration for the moba-edu course: run nbgrader from this folder (docs/teaching.md)."""

import sys
from pathlib import Path

from nbgrader.converters import Autograde, GenerateAssignment
from nbgrader.preprocessors import ClearOutput, Execute

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moba_course import GradingExecute, KeepStoredOutputs  # noqa: E402

c = get_config()  # noqa: F821 (nbgrader defines it)

c.CourseDirectory.course_id = "moba-edu"
c.CourseDirectory.root = str(Path(__file__).resolve().parent)

# Release: solutions become `raise NotImplementedError()`, hidden tests are cut (and kept in the
# gradebook for autograding); outputs are cleared except where KeepStoredOutputs keeps them.
c.GenerateAssignment.preprocessors = [KeepStoredOutputs if p is ClearOutput else p
                                      for p in GenerateAssignment.preprocessors.default()]

# Autograde: hidden tests restored, every notebook run top to bottom in a kernel in grading mode.
c.Autograde.autograde_preprocessors = [GradingExecute if p is Execute else p
                                       for p in Autograde.autograde_preprocessors.default()]
c.Execute.timeout = 900  # seconds per cell: the Triton notebooks run under the CPU interpreter
c.GradingExecute.hidden_seed = 0  # pick your own (or pass --GradingExecute.hidden_seed=N to autograde)
