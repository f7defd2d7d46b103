"""Teacher backends behind one protocol (see :mod:`accord.teachers.base`)."""

from accord.teachers.base import (
                                  Generation,
                                  NotSupported,
                                  Request,
                                  SamplingParams,
                                  Teacher,
                                  TeacherConfigError,
                                  TeacherUnavailable,
                                  load_teacher,
)

__all__ = ["Generation", "NotSupported", "Request", "SamplingParams", "Teacher", "TeacherConfigError",
           "TeacherUnavailable", "load_teacher"]
