"""Resonance Task: message fan-out and push for an IM platform, a Faust topology.

The app is `resonance_task.app`; run it with `faust -A resonance_task.app worker`.
"""
