"""Eviction policies, one per module, each behind :class:`kvroute.eviction.base.EvictionPolicy`."""
