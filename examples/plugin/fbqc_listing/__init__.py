"""fbqc-listing: an out-of-tree fbqc backend (``--target listing``) that writes the INTEGER program as a
readable text listing and runs it with its own executor. It exists to show the backend contract."""
from .backend import ListingBackend, ListingOptions

__version__ = "0.1.0"
__all__ = ["ListingBackend", "ListingOptions", "__version__"]
