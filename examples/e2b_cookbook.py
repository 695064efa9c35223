"""An E2B code-interpreter program, unchanged (the shape of E2B's cookbook examples), run on stockade:

    stockade keys create --tenant me            # prints a key
    stockade serve --port 8421 &
    export E2B_API_URL=http://127.0.0.1:8421/e2b
    export E2B_SANDBOX_URL=http://127.0.0.1:8421/e2b/sandbox
    export E2B_API_KEY=sk_...
    pip install e2b-code-interpreter
    python examples/e2b_cookbook.py
"""

import base64

from e2b_code_interpreter import Sandbox

with Sandbox.create() as sandbox:
    sandbox.files.write("/home/user/data.csv", "x,y\n1,2\n2,4\n3,9\n")
    execution = sandbox.run_code(
        "import pandas as pd\n"
        "import matplotlib.pyplot as plt\n"
        "df = pd.read_csv('/home/user/data.csv')\n"
        "df.plot(x='x', y='y')\n"
        "plt.show()\n"
        "df.describe()",
        on_stdout=lambda line: print("stdout:", line),
    )
    if execution.error:
        print("error:", execution.error.name, execution.error.value)
    for i, result in enumerate(execution.results):
        if result.png:
            with open(f"chart-{i}.png", "wb") as f:
                f.write(base64.b64decode(result.png))
            print(f"saved chart-{i}.png")
        if result.html:
            print("a table of", len(result.html), "bytes of HTML")
    print(sandbox.commands.run("python3 -c 'print(sum(range(10)))'").stdout)
