"""The core: the supervisor's loop and everything it owns.

:mod:`.supervisor` (the one task that owns every child's state: commands in, leases and
published facts out), :mod:`.child` (the records it keeps: each child's state machine,
leases, waiters, each profile's health), :mod:`.messages` (what goes in and out of its
loop: commands, helper reports, published facts), :mod:`.process` (one llama-server),
:mod:`.planner` (what may be resident together: a pure function), :mod:`.preflight`,
:mod:`.footprint`, :mod:`.slotcache` and :mod:`.statedir`.

The front end (``swapd.http``) and ``swapd.observe`` see the core only through the names
below: the supervisor's commands and snapshots, the facts it publishes, a child's log.
``tests/test_layout.py`` holds them to that.
"""

from swapd.core.child import Lease, State
from swapd.core.messages import Crashed, Event, Evicted, Launcher, Loaded, LoadFailed, Swapped
from swapd.core.process import ChildLog
from swapd.core.supervisor import Supervisor

__all__ = [
    "ChildLog", "Crashed", "Event", "Evicted", "Launcher", "Lease", "LoadFailed", "Loaded",
    "State", "Supervisor", "Swapped",
]
