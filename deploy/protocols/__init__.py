"""The shipped protocols, installed as insitu_daq.protocols so `insitu-daq demo` finds them."""
