# Stands in for slurmstepd: run as a copy of python named `slurmstepd` with the step label in
# its command line; the task process (waiter) is its child. argv: LABEL SCRIPT ARGS...
import subprocess, sys
sys.exit(subprocess.call(["/usr/bin/python3"] + sys.argv[2:]))
