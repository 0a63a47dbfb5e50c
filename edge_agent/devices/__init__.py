"""The cell's hardware: device profiles, gpiozero inputs and outputs, the machine simulator.

Imports only `errors` and `config` of the agent's own modules: it knows pins, not orders.
"""
