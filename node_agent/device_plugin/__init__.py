"""copack's Kubernetes device plugin: advertises `copack.io/gpu` slots per unit and, at
admission, gives each container exactly the unit the extender chose (see docs/device-plugin.md)."""
