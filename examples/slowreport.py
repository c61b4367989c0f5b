#!/usr/bin/env python3
"""An example script with genuinely slow start-up: about 0.1-0.2 s of imports.

The imports (stdlib, typer, rich, psutil) are the cost a real tool pays before doing anything.

Run directly it pays for the imports every time; run through prefork-interp
(``#!/usr/bin/prefork-interp -U,python3`` as its first line) it pays once per server, and each
call only forks.  ``examples/demo.py`` times both.

Usage: slowreport.py [--exit N] [ARGS ...] < text
Prints its arguments and the line, word and byte counts of stdin, then exits with status N.
"""

# The slow part: done once, in the server, before initialisation_complete().
import argparse
import asyncio
import concurrent.futures
import configparser
import csv
import dataclasses
import decimal
import difflib
import doctest
import email.mime.multipart
import email.parser
import http.client
import http.server
import imaplib
import inspect
import json
import logging.handlers
import mailbox
import multiprocessing
import os
import pdb
import pydoc
import smtplib
import sqlite3
import ssl
import statistics
import sys
import tarfile
import unittest
import urllib.request
import uuid
import wsgiref.simple_server
import xml.dom.minidom
import xml.etree.ElementTree
import xmlrpc.server
import zipfile

import psutil
import rich.console
import rich.table
import typer
import typer.main

import prefork

SLOW_MODULES = (
    asyncio, concurrent.futures, configparser, csv, dataclasses, decimal, difflib, doctest,
    email.mime.multipart, email.parser, http.client, http.server, imaplib, inspect, json,
    logging.handlers, mailbox, multiprocessing, pdb, psutil, pydoc, rich.console, rich.table,
    smtplib, sqlite3, ssl, statistics, tarfile, typer, typer.main, unittest, urllib.request,
    uuid, wsgiref.simple_server, xml.dom.minidom, xml.etree.ElementTree, xmlrpc.server, zipfile,
)

prefork.initialisation_complete()

# The per-call part: runs in a fresh fork with this call's argv, environment and stdio.
parser = argparse.ArgumentParser(description="count stdin, echo arguments")
parser.add_argument("--exit", type=int, default=0, metavar="N", help="exit status")
parser.add_argument("args", nargs="*")
ns = parser.parse_args()

data = sys.stdin.buffer.read()
report = {
    "argv0": os.path.basename(sys.argv[0]),
    "args": ns.args,
    "lines": data.count(b"\n"),
    "words": len(data.split()),
    "bytes": len(data),
    "modules": len(SLOW_MODULES),
}
print(json.dumps(report, sort_keys=True))
sys.exit(ns.exit)
