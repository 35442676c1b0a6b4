"""`faust -A app worker` from a checkout, as the design names it: the app lives in the
package, `resonance_task.app` (what the image and `pip install` run)."""

from resonance_task.app import app

__all__ = ["app"]
