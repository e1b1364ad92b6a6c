"""Exceptions raised by the core. Front ends show ``str(error)`` as the one line a user reads."""


class MeshNetLesionError(Exception):
    """Base class of every error the core raises on purpose."""


class InputError(MeshNetLesionError):
    """The input volume cannot be segmented (wrong dimensionality, empty, non-finite, unreadable)."""


class ModelError(MeshNetLesionError):
    """A model description or weight file is missing, malformed or inconsistent."""


class IntegrityError(ModelError):
    """A file's SHA-256 does not match the registry."""


class UnknownModelError(ModelError):
    """No registry entry has the requested id."""


class DeviceError(MeshNetLesionError):
    """The requested compute device is not available."""


class Cancelled(MeshNetLesionError):
    """The run was cancelled through its cancel event; nothing was written."""


class OutputError(MeshNetLesionError):
    """An output cannot be written (no space, no permission); earlier files are left as they were."""


class ResourceError(MeshNetLesionError):
    """The machine lacks the memory (or another resource) this run needs; the message says how much."""
