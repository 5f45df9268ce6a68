"""Protocol plumbing shared by the front ends: TLS, shared access signatures, (later) MQTT.

Nothing in here knows about enrollments, hubs or policies.
"""
