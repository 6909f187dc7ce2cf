"""An EC2 + instance-metadata emulator for testing an IPAM daemon without AWS.

moto (pinned) keeps the EC2 state; this package makes it behave like EC2 where IPAM
depends on it (limits, unique addresses, prefixes, attachment rules), serves IMDS from
that state, and injects faults on request.
"""
