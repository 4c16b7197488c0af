"""Players: a recording played as live sources (LSL outlets, MQTT device payloads), so a lab
or edge config can be tried without hardware."""
