"""Delivery: couriers (smarthost, hold, ...) behind one small protocol, and the router."""
