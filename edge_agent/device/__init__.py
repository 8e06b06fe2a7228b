"""The device's own state: sensors (battery, power, thermal, load, memory, disk, network) and the
pure "may I train / download / upload now?" decision made from a snapshot of them."""
