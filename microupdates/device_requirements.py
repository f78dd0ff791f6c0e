"""Package managers a recipe needs on a device, and the reason a device without them is skipped.

The names are those of DeviceFacts.package_managers. The check is pure, so
the device workflow can run it on the facts that reach it with the check-in.
"""

from __future__ import annotations

from microupdates.protocol.recipe import Dependencies

# The reason a device without the named fact cannot run the dependencies stage.
MISSING_FACT_REASONS = {
    "apt": "apt-get and dpkg are not installed on this device",
    "pip": "pip is not installed for `python` on this device (`python -m pip` does not run)",
    "pip3": "pip is not installed for `python3` on this device (`python3 -m pip` does not run)",
    "npm": "npm is not installed on this device",
    "python3": "python3 is not installed on this device, so the recipe's virtualenv cannot be created",
}


def required_package_managers(dependencies: Dependencies) -> list[str]:
    """Return the facts a device needs for the recipe's package groups that list packages.

    A pip or pip3 group with a virtualenv needs python3, which creates the
    virtualenv and whose pip then installs into it.
    """

    required: list[str] = []
    if dependencies.apt is not None and dependencies.apt.packages:
        required.append("apt")
    for manager in ("pip", "pip3"):
        group = getattr(dependencies, manager)
        if group is not None and group.packages:
            required.append("python3" if group.virtualenv else manager)
    if dependencies.npm is not None and dependencies.npm.packages:
        required.append("npm")
    return sorted(set(required))


def incompatibility(required: list[str], available: list[str] | None) -> str | None:
    """Return why a device with the `available` facts cannot run the update, or None.

    None as `available` means the device never reported facts; such a device
    is not skipped, because unknown is not incompatible.
    """

    if available is None:
        return None
    missing = [name for name in required if name not in available]
    if not missing:
        return None
    return "; ".join(MISSING_FACT_REASONS.get(name, f"{name} is not available on this device") for name in missing)
