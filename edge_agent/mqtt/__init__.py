"""MQTT: inbound orders and commands (acknowledged after commit), outbound from the log."""
